//! `JobIdentity::parse` on arbitrary bytes: the runner's job response file, which carries the
//! job token and the pipeline's variables.
//!
//! Invariants: no panic; an accepted identity has a positive job id; an error never echoes
//! content of the file. The echo check is twofold: an input containing the marker `SECRET-`
//! never yields an error containing it, and no run of more than 8 characters taken from a
//! string in the input (a JSON string value or key, or any quoted run when the JSON is broken)
//! appears in the error, unless that run is part of the fixed wording hyperjob's own errors use
//! for inputs without such strings.

#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use hyperjob_core::job::JobIdentity;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const PATH: &str = "/run/gitlab-runner/response.json";
const MARKER: &str = "SECRET-";
/// Runs of this many characters or more from the input may not appear in an error.
const ECHO_LEN: usize = 9;

/// Inputs that reach every kind of error without any string content worth leaking.
const PROBES: &[&str] = &[
    "",
    "{",
    "[1,2",
    "{}",
    "[]",
    "1",
    "{\"id\":null}",
    "{\"id\":0}",
    "{\"id\":-1}",
    "{\"id\":1.5}",
    "{\"id\":\"\"}",
    "{\"id\":1,\"runner_info\":{\"timeout\":-1}}",
    "{\"id\":1,\"runner_info\":{\"timeout\":\"\"}}",
    "{\"id\":1,\"runner_info\":{\"timeout\":[]}}",
];

/// Digit runs count as one digit, so that positions ("line 12, column 345") compare equal to
/// the ones the probes produce.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('0');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// The fixed wording of hyperjob's errors: every error message the probes produce.
fn vocabulary() -> &'static str {
    static VOCABULARY: OnceLock<String> = OnceLock::new();
    VOCABULARY.get_or_init(|| {
        let mut all = String::new();
        for probe in PROBES {
            if let Err(err) = JobIdentity::parse(Path::new(PATH), probe.as_bytes()) {
                all.push_str(&normalise(&err.to_string()));
                all.push('\u{0}');
            }
        }
        all
    })
}

fn collect_json_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_json_strings(item, out)),
        Value::Object(map) => {
            for (key, item) in map {
                out.push(key.clone());
                collect_json_strings(item, out);
            }
        }
        _ => {}
    }
}

/// The text between double quotes, scanned leniently (escapes taken literally), so broken
/// JSON is covered too.
fn quoted_runs(bytes: &[u8]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut rest = bytes;
    while let Some(open) = rest.iter().position(|b| *b == b'"') {
        rest = &rest[open + 1..];
        let mut end = 0;
        while end < rest.len() && rest[end] != b'"' {
            end += if rest[end] == b'\\' { 2 } else { 1 };
        }
        let end = end.min(rest.len());
        runs.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[(end + 1).min(rest.len())..];
    }
    runs
}

fn assert_no_echo(data: &[u8], message: &str) {
    let input = String::from_utf8_lossy(data);
    if input.contains(MARKER) {
        assert!(
            !message.contains(MARKER),
            "error echoes the input: {message:?}\ninput: {input:?}"
        );
    }

    let mut strings = quoted_runs(data);
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        collect_json_strings(&value, &mut strings);
    }
    let shown = normalise(message);
    let known = vocabulary();
    let mut checked = HashSet::new();
    for text in &strings {
        let chars: Vec<char> = normalise(text).chars().collect();
        for window in chars.windows(ECHO_LEN) {
            let run: String = window.iter().collect();
            if !checked.insert(run.clone()) {
                continue;
            }
            assert!(
                !shown.contains(&run) || known.contains(&run),
                "error echoes {run:?} from the input: {message:?}\ninput: {input:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match JobIdentity::parse(Path::new(PATH), data) {
        Ok(job) => {
            assert!(job.job_id > 0, "job id 0 accepted from {data:?}");
            // The VM name (name_prefix + job id, default prefix here) is used in XML, file
            // names and shell words unquoted.
            let name = format!("hyperjob-job-{}", job.job_id);
            assert!(
                name.strip_prefix("hyperjob-job-")
                    .is_some_and(|id| id.bytes().all(|b| b.is_ascii_digit())),
                "{name:?}"
            );
        }
        Err(err) => assert_no_echo(data, &err.to_string()),
    }
});
