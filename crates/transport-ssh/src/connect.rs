//! Reaching a guest that is still coming up: a new TCP connection attempt every
//! [`PROBE_INTERVAL`], each left running while later ones start, and the first that connects
//! wins.
//!
//! Right after the guest's DHCP lease appears, its first SYN is often lost: the guest has not
//! configured the address yet, or libvirt's nwfilter has not yet learnt it. A single blocking
//! connect then waits for the kernel's SYN retransmission, 1 s later (measured: the lease at
//! 5.9 s, the connection at 7.0 s). Starting a fresh attempt every 50 ms instead gets through
//! within 50 ms of the guest being able to answer, as a probe loop run beside the boot would; a
//! refused connection (the address is up, the SSH server not yet) is simply tried again.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How often a new connection attempt starts.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Attempts in flight at once (2 s of them); the oldest is given up for a new one.
const MAX_IN_FLIGHT: usize = 40;

/// How an attempt went.
enum Outcome {
    Connected,
    Pending,
    Failed(io::Error),
}

/// The first TCP connection to `addr` that succeeds within `window`. Errors: `TimedOut` (with
/// the last refusal or failure, if any, in its message), `Interrupted` once `cancel` is set.
pub fn first_connection(
    addr: SocketAddr,
    window: Duration,
    cancel: &AtomicBool,
) -> io::Result<TcpStream> {
    let deadline = Instant::now() + window;
    let mut in_flight: Vec<Socket> = Vec::new();
    let mut last_error: Option<io::Error> = None;
    let mut next_start = Instant::now();
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        let now = Instant::now();
        if now >= next_start && now < deadline {
            if in_flight.len() >= MAX_IN_FLIGHT {
                in_flight.remove(0);
            }
            match start(addr) {
                Ok(socket) => in_flight.push(socket),
                Err(err) => last_error = Some(err),
            }
            next_start += PROBE_INTERVAL;
        }
        let mut index = 0;
        while index < in_flight.len() {
            match outcome(&in_flight[index]) {
                Outcome::Connected => {
                    let socket = in_flight.swap_remove(index);
                    socket.set_nonblocking(false)?;
                    return Ok(socket.into());
                }
                Outcome::Pending => index += 1,
                Outcome::Failed(err) => {
                    last_error = Some(err);
                    in_flight.swap_remove(index);
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let why = last_error.map_or_else(
                || "no answer".to_string(),
                |err| format!("last attempt: {err}"),
            );
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no TCP connection within {:.1} s ({why})",
                    window.as_secs_f64()
                ),
            ));
        }
        // Until the next attempt starts, the deadline, or something happens to one in flight;
        // in slices, so a cancel is seen promptly.
        let wait = next_start
            .max(now)
            .min(deadline)
            .saturating_duration_since(now)
            .min(PROBE_INTERVAL);
        wait_writable(&in_flight, wait)?;
    }
}

/// Starts one non-blocking connect (in progress, or already connected).
fn start(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => Ok(socket),
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(err) => Err(err),
    }
}

/// Whether a non-blocking connect finished, and how.
fn outcome(socket: &Socket) -> Outcome {
    match socket.take_error() {
        Ok(Some(err)) | Err(err) => Outcome::Failed(err),
        Ok(None) => match socket.peer_addr() {
            Ok(_) => Outcome::Connected,
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => Outcome::Pending,
            Err(err) => Outcome::Failed(err),
        },
    }
}

/// Waits up to `timeout` until one of `sockets` becomes writable (its connect finished).
fn wait_writable(sockets: &[Socket], timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if sockets.is_empty() {
        std::thread::sleep(timeout);
        return Ok(());
    }
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|socket| libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        })
        .collect();
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let count = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `fds` is a valid array of `count` pollfd structs that lives across the call; the
    // file descriptors belong to sockets that stay open meanwhile; poll(2) only writes revents.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), count, millis) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn a_listening_port_is_connected_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = AtomicBool::new(false);

        let stream = first_connection(addr, Duration::from_secs(30), &cancel).expect("connect");

        assert_eq!(stream.peer_addr().expect("peer"), addr);
        let (_accepted, from) = listener.accept().expect("accept");
        assert_eq!(from, stream.local_addr().expect("local"));
    }

    #[test]
    fn a_port_that_starts_listening_later_is_reached_by_a_later_attempt() {
        // A port we hold closed (bound, not listening), so nobody else can take it: connects
        // are refused until it listens.
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("reuse");
        socket
            .bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("bind");
        let addr = socket
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        let cancel = AtomicBool::new(false);

        let stream = std::thread::scope(|scope| {
            let connector =
                scope.spawn(|| first_connection(addr, Duration::from_secs(60), &cancel));
            // Refused attempts happen while the port is closed; then it opens.
            std::thread::sleep(PROBE_INTERVAL * 4);
            socket.listen(8).expect("listen");
            connector.join().expect("join")
        })
        .expect("a later attempt connects");

        assert_eq!(stream.peer_addr().expect("peer"), addr);
    }

    /// A loopback port the test holds without listening: connections to it are refused.
    fn bound_not_listening() -> (Socket, SocketAddr) {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket
            .bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("bind");
        let addr = socket
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        (socket, addr)
    }

    #[test]
    fn a_refused_port_times_out_naming_the_refusal() {
        let (_socket, addr) = bound_not_listening();
        let cancel = AtomicBool::new(false);

        let err = first_connection(addr, Duration::from_millis(300), &cancel).expect_err("closed");

        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[test]
    fn a_cancel_ends_the_attempts() {
        let (_socket, addr) = bound_not_listening();
        let cancel = AtomicBool::new(true);

        let err = first_connection(addr, Duration::from_secs(600), &cancel).expect_err("cancel");

        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }
}
