//! The relay's wire format on its UNIX socket: frames of one kind byte, a big-endian `u32`
//! length and that many bytes of payload.
//!
//! `run` → relay: `R` (a script: its interpreter, a newline, the script) and `C` (stop it).
//! relay → `run`: `A` (taken: from here on the script may run in the guest), `O` / `E`
//! (stdout / stderr bytes, in the order the guest sent them), then one of `X` (how the script
//! exited: `code N` or `signal NAME`, then optionally a line `ran SECONDS`, how long the script
//! ran in the guest as the relay saw it), `F` (it failed: `interrupted …` or `system …`) or `N`
//! (it was not started: run it another way).

use std::io::{self, Read, Write};

use crate::plugin::{PluginError, RemoteExit};

/// The largest frame either side accepts: a script is rarely more than a few MiB.
const MAX_PAYLOAD: usize = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Run,
    Cancel,
    Accepted,
    Stdout,
    Stderr,
    Exit,
    Failed,
    NotStarted,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Run => b'R',
            Kind::Cancel => b'C',
            Kind::Accepted => b'A',
            Kind::Stdout => b'O',
            Kind::Stderr => b'E',
            Kind::Exit => b'X',
            Kind::Failed => b'F',
            Kind::NotStarted => b'N',
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        [
            Kind::Run,
            Kind::Cancel,
            Kind::Accepted,
            Kind::Stdout,
            Kind::Stderr,
            Kind::Exit,
            Kind::Failed,
            Kind::NotStarted,
        ]
        .into_iter()
        .find(|kind| kind.byte() == byte)
    }
}

/// Writes one frame with a single `write_all`, so frames written under a lock never mix.
pub(crate) fn write_frame(to: &mut dyn Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|length| *length as usize <= MAX_PAYLOAD)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind.byte());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(payload);
    to.write_all(&frame)?;
    to.flush()
}

/// Reads one frame; `None` when the stream ends before a frame starts.
pub(crate) fn read_frame(from: &mut dyn Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match from.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let kind = Kind::from_byte(header[0]).ok_or_else(|| invalid("unknown frame kind"))?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if length > MAX_PAYLOAD {
        return Err(invalid("frame too large"));
    }
    let mut payload = vec![0u8; length];
    from.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

/// The payload of `R`.
pub(crate) fn encode_run(interpreter: &str, script: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(interpreter.len() + 1 + script.len());
    payload.extend_from_slice(interpreter.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(script);
    payload
}

/// The interpreter and script of an `R` payload; only interpreters `run` ever asks for.
pub(crate) fn decode_run(mut payload: Vec<u8>) -> Option<(&'static str, Vec<u8>)> {
    let newline = payload.iter().position(|b| *b == b'\n')?;
    let interpreter = match &payload[..newline] {
        b"bash" => "bash",
        b"sh" => "sh",
        _ => return None,
    };
    Some((interpreter, payload.split_off(newline + 1)))
}

/// The payload of `X`: the exit, and how long the script ran (seconds).
pub(crate) fn encode_exit(exit: &RemoteExit, ran: f64) -> Vec<u8> {
    let exit = match exit {
        RemoteExit::Code(code) => format!("code {code}"),
        RemoteExit::Signal(name) => format!("signal {name}"),
    };
    format!("{exit}\nran {ran:.6}").into_bytes()
}

/// The exit in an `X` payload.
pub(crate) fn decode_exit(payload: &[u8]) -> Option<RemoteExit> {
    let text = std::str::from_utf8(payload).ok()?;
    let text = text.split('\n').next()?;
    match text.split_once(' ')? {
        ("code", code) => code.parse().ok().map(RemoteExit::Code),
        ("signal", name) if !name.is_empty() => Some(RemoteExit::Signal(name.to_string())),
        _ => None,
    }
}

/// How long the script ran, from an `X` payload (`None` from a relay that does not say).
pub(crate) fn decode_ran(payload: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(payload).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("ran "))?
        .parse()
        .ok()
        .filter(|seconds: &f64| seconds.is_finite() && *seconds >= 0.0)
}

/// The payload of `F`: the error's class and its whole cause chain on one line.
pub(crate) fn encode_failure(err: &PluginError) -> Vec<u8> {
    match err {
        PluginError::Interrupted(during) => format!("interrupted {during}").into_bytes(),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            format!("system {text}").into_bytes()
        }
    }
}

pub(crate) fn decode_failure(payload: &[u8]) -> PluginError {
    let text = String::from_utf8_lossy(payload);
    match text.split_once(' ') {
        Some(("interrupted", during)) => PluginError::Interrupted(during.to_string()),
        Some(("system", message)) => PluginError::msg(message),
        _ => PluginError::msg(format!("the job's relay failed: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_in_order_and_the_end_is_clean() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Stdout, b"out").expect("write");
        write_frame(&mut wire, Kind::Accepted, b"").expect("write");
        write_frame(&mut wire, Kind::Stderr, &[0, 255, b'\n']).expect("write");
        let mut reader = wire.as_slice();

        assert_eq!(
            read_frame(&mut reader).expect("read"),
            Some((Kind::Stdout, b"out".to_vec()))
        );
        assert_eq!(
            read_frame(&mut reader).expect("read"),
            Some((Kind::Accepted, Vec::new()))
        );
        assert_eq!(
            read_frame(&mut reader).expect("read"),
            Some((Kind::Stderr, vec![0, 255, b'\n']))
        );
        assert_eq!(read_frame(&mut reader).expect("read"), None);
    }

    #[test]
    fn a_cut_frame_and_an_unknown_kind_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Stdout, b"output").expect("write");

        assert!(read_frame(&mut &wire[..3]).is_err());
        assert!(read_frame(&mut &wire[..8]).is_err());
        assert!(read_frame(&mut &b"Z\0\0\0\0"[..]).is_err());
        assert!(read_frame(&mut &b"O\xff\xff\xff\xff"[..]).is_err());
    }

    #[test]
    fn a_run_request_carries_interpreter_and_script_and_nothing_else_runs() {
        let payload = encode_run("sh", b"echo a\necho b\n");

        assert_eq!(
            decode_run(payload),
            Some(("sh", b"echo a\necho b\n".to_vec()))
        );
        assert_eq!(
            decode_run(encode_run("bash", b"")),
            Some(("bash", Vec::new()))
        );
        assert_eq!(decode_run(encode_run("rm -rf /; bash", b"x")), None);
        assert_eq!(decode_run(b"bash".to_vec()), None);
    }

    #[test]
    fn exits_round_trip() {
        for exit in [
            RemoteExit::Code(0),
            RemoteExit::Code(-1),
            RemoteExit::Code(42),
            RemoteExit::Signal("USR1".into()),
        ] {
            let payload = encode_exit(&exit, 0.25);
            assert_eq!(decode_exit(&payload), Some(exit));
            assert_eq!(decode_ran(&payload), Some(0.25));
        }
        // A relay that does not say how long the script ran.
        assert_eq!(decode_exit(b"code 3"), Some(RemoteExit::Code(3)));
        assert_eq!(decode_ran(b"code 3"), None);
        assert_eq!(decode_ran(b"code 3\nran -1"), None);
        assert_eq!(decode_exit(b"code x"), None);
        assert_eq!(decode_exit(b"signal "), None);
    }

    #[test]
    fn failures_keep_their_class_and_their_cause_chain() {
        let interrupted = PluginError::Interrupted("before the script was sent".into());
        let system = PluginError::system(
            "reading the script's output failed",
            std::io::Error::other("connection reset"),
        );

        let back = decode_failure(&encode_failure(&interrupted));
        let message = decode_failure(&encode_failure(&system)).to_string();

        assert!(
            matches!(back, PluginError::Interrupted(ref d) if d == "before the script was sent")
        );
        assert_eq!(
            message,
            "reading the script's output failed: connection reset"
        );
    }
}
