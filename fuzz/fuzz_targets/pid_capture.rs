//! `PidCapture::feed` over an arbitrary chunking of arbitrary bytes: the remote stderr stream
//! as the SSH channel delivers it.
//!
//! Input layout: the first byte `n` gives the number of chunk lengths that follow (`n % 16`
//! bytes, each a chunk length 0–255, used round-robin); the rest is the stream. No lengths
//! means one chunk.
//!
//! Invariant (nothing lost, nothing invented): the bytes `feed` returned, concatenated, plus
//! what `finish` returns when the stream ends (as the relay loop does), are the stream itself,
//! or, when its first line is the marker line, the stream without that line; a process group
//! is remembered only from a marker line, and never 0 or 1.

#![no_main]

use hyperjob_transport_ssh::PidCapture;
use libfuzzer_sys::fuzz_target;

const MARKER: &[u8] = b"hyperjob-remote-pgid ";

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    let count = usize::from(count % 16).min(rest.len());
    rest.split_at(count)
}

fuzz_target!(|data: &[u8]| {
    let (lengths, stream) = split(data);

    let mut capture = PidCapture::default();
    let mut passed = Vec::with_capacity(stream.len());
    let mut rest = stream;
    if lengths.is_empty() {
        passed.extend_from_slice(&capture.feed(rest));
        rest = &[];
    }
    let mut turn = 0;
    let mut idle_turns = 0;
    while !rest.is_empty() {
        let mut len = usize::from(lengths[turn % lengths.len()]).min(rest.len());
        turn += 1;
        if len == 0 {
            // Empty reads happen; but all-zero lengths must still make progress.
            idle_turns += 1;
            if idle_turns >= lengths.len() {
                len = rest.len();
            }
        } else {
            idle_turns = 0;
        }
        let (chunk, tail) = rest.split_at(len);
        passed.extend_from_slice(&capture.feed(chunk));
        rest = tail;
    }

    passed.extend_from_slice(&capture.finish());

    let first_line = stream
        .iter()
        .position(|b| *b == b'\n')
        .map(|newline| stream.split_at(newline + 1));
    match first_line {
        Some((line, _)) if line.starts_with(MARKER) && line.len() > 65 && passed == stream => {
            // A marker line longer than the capture looks ahead may arrive in pieces and be
            // passed on unrecognised: then nothing is remembered.
            assert_eq!(capture.pid(), None);
        }
        Some((line, after)) if line.starts_with(MARKER) => {
            assert!(
                passed == after,
                "stderr after the marker line changed\nstream: {stream:?}\npassed: {passed:?}"
            );
            let number = String::from_utf8_lossy(&line[MARKER.len()..]);
            let expected = number.trim().parse::<u32>().ok().filter(|pgid| *pgid > 1);
            assert_eq!(capture.pid(), expected, "{line:?}");
        }
        _ if passed == stream => assert_eq!(capture.pid(), None),
        _ => {
            // Only a marker line found within the first 64 bytes may be taken off.
            panic!(
                "stderr changed without a marker line: {} of {} bytes passed on\nstream: {stream:?}\npassed: {passed:?}",
                passed.len(),
                stream.len()
            );
        }
    }
});
