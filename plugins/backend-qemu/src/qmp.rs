//! A minimal QMP (QEMU Machine Protocol) client: enough to ask QEMU to quit.
//!
//! QMP is line-delimited JSON over the VM's unix socket: QEMU greets (`{"QMP": …}`), the
//! client leaves capabilities negotiation mode with `qmp_capabilities`, then executes commands.
//! Every command gets one `{"return": …}` or `{"error": …}`; asynchronous `{"event": …}` lines
//! may come in between and are skipped.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Longest line accepted from the server.
const MAX_LINE: u64 = 64 * 1024;

/// Connects to `socket` and asks QEMU to quit. Each read and write is bounded by `timeout`.
pub fn quit(socket: &Path, timeout: Duration) -> io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    quit_session(stream)
}

/// The protocol of [`quit`] over any byte stream: greeting, `qmp_capabilities`, `quit`.
pub fn quit_session<S: Read + Write>(stream: S) -> io::Result<()> {
    let mut session = Session {
        reader: BufReader::new(stream),
    };
    let greeting = session
        .read_message()?
        .ok_or_else(|| protocol("the socket closed before the QMP greeting"))?;
    if greeting.get("QMP").is_none() {
        return Err(protocol(format!("expected a QMP greeting, got {greeting}")));
    }
    session.execute("qmp_capabilities")?;
    match session.execute("quit") {
        Ok(()) => Ok(()),
        // QEMU may close the connection as it exits, before or instead of its answer.
        Err(err) if gone(&err) => Ok(()),
        Err(err) => Err(err),
    }
}

struct Session<S> {
    reader: BufReader<S>,
}

impl<S: Read + Write> Session<S> {
    /// Sends a command without arguments and waits for its answer.
    fn execute(&mut self, command: &str) -> io::Result<()> {
        let mut line = serde_json::json!({ "execute": command }).to_string();
        line.push('\n');
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes())?;
        stream.flush()?;
        loop {
            let Some(message) = self.read_message()? else {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("the socket closed before QEMU answered {command:?}"),
                ));
            };
            if message.get("return").is_some() {
                return Ok(());
            }
            if let Some(error) = message.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(protocol(format!("QEMU refused {command:?}: {desc}")));
            }
            // An event (or anything else that is not our answer): keep reading.
        }
    }

    /// The next JSON object, or `None` at end of stream.
    fn read_message(&mut self) -> io::Result<Option<Value>> {
        loop {
            let mut line = String::new();
            let read = (&mut self.reader).take(MAX_LINE).read_line(&mut line)?;
            if read == 0 {
                return Ok(None);
            }
            if !line.ends_with('\n') && read as u64 == MAX_LINE {
                return Err(protocol("a QMP message longer than 64 KiB"));
            }
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line.trim())
                .map_err(|err| protocol(format!("QMP sent something that is not JSON: {err}")))?;
            if !value.is_object() {
                return Err(protocol(format!("QMP sent {value}, not an object")));
            }
            return Ok(Some(value));
        }
    }
}

fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, message.into())
}

/// Errors that mean "the other side went away".
fn gone(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::thread;

    use super::*;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": [\"oob\"]}}\n";

    /// Runs `server` as a fake QEMU on one end of a socket pair; returns the client's result
    /// and what the server received.
    fn against(
        server: impl FnOnce(&mut BufReader<UnixStream>) + Send + 'static,
    ) -> (io::Result<()>, Vec<String>) {
        let (client, server_end) = UnixStream::pair().expect("socket pair");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let fake = thread::spawn(move || {
            let mut reader = BufReader::new(server_end);
            server(&mut reader);
            // The fake QEMU is done talking (as if it exited): the client sees end of stream.
            let _ = reader.get_ref().shutdown(std::net::Shutdown::Write);
            // Whatever the client sent after the script ended.
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
            rest
        });
        let result = quit_session(client);
        let rest = fake.join().expect("fake server");
        (result, rest.lines().map(str::to_string).collect())
    }

    fn expect_line(reader: &mut BufReader<UnixStream>, expected: &str) {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read");
        assert_eq!(line, format!("{expected}\n"));
    }

    fn send(reader: &mut BufReader<UnixStream>, text: &str) {
        reader.get_mut().write_all(text.as_bytes()).expect("write");
    }

    #[test]
    fn quit_negotiates_then_quits_skipping_events() {
        let (result, rest) = against(|server| {
            send(server, GREETING);
            expect_line(server, "{\"execute\":\"qmp_capabilities\"}");
            send(
                server,
                "{\"event\": \"NIC_RX_FILTER_CHANGED\", \"data\": {}}\n{\"return\": {}}\n",
            );
            expect_line(server, "{\"execute\":\"quit\"}");
            send(
                server,
                "{\"timestamp\": {\"seconds\": 1}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\n{\"return\": {}}\n",
            );
        });

        result.expect("quit succeeds");
        assert!(rest.is_empty(), "sent more than needed: {rest:?}");
    }

    #[test]
    fn quit_counts_a_closed_socket_after_the_command_as_success() {
        let (result, _) = against(|server| {
            send(server, GREETING);
            expect_line(server, "{\"execute\":\"qmp_capabilities\"}");
            send(server, "{\"return\": {}}\n");
            expect_line(server, "{\"execute\":\"quit\"}");
            // QEMU exits without answering.
        });

        result.expect("a vanished QEMU is what quit asked for");
    }

    #[test]
    fn an_error_answer_is_reported_with_its_description() {
        let (result, _) = against(|server| {
            send(server, GREETING);
            expect_line(server, "{\"execute\":\"qmp_capabilities\"}");
            send(
                server,
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\n",
            );
        });

        let err = result.expect_err("refused");
        assert_eq!(err.to_string(), "QEMU refused \"qmp_capabilities\": nope");
    }

    #[test]
    fn something_that_is_not_qmp_is_refused_before_any_command() {
        let (result, rest) = against(|server| {
            send(server, "SSH-2.0-OpenSSH_9.2\r\n");
        });

        let err = result.expect_err("not QMP");
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        assert!(
            rest.is_empty(),
            "sent a command to a non-QMP peer: {rest:?}"
        );
    }

    #[test]
    fn a_closed_socket_before_the_greeting_is_an_error() {
        let (result, _) = against(|_server| {});

        let err = result.expect_err("no greeting");
        assert!(err.to_string().contains("before the QMP greeting"), "{err}");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (client, _server_end) = UnixStream::pair().expect("socket pair");
        client
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");

        let err = quit_session(client).expect_err("silence");

        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );
    }

    #[test]
    fn no_socket_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");

        let err = quit(&dir.path().join("vm.qmp"), Duration::from_secs(1)).expect_err("absent");

        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
}
