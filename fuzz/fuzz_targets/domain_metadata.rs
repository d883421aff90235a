//! `xml::parse_metadata` on arbitrary text (the metadata element libvirt returns for any domain
//! on the host, hyperjob's or not) and `xml::escape` on the same text.
//!
//! Invariants: no panic; a record that was read back (owner included) re-reads identically from
//! hyperjob's own rendering; escaped text has no `<`, `>`, `'` or `"`, every `&` starts one of the five XML
//! entities, no control character other than tab, newline and carriage return survives, and
//! unescaping gives the input back (control characters as U+FFFD).

#![no_main]

use hyperjob_backend_libvirt::xml::{self, METADATA_NS};
use libfuzzer_sys::fuzz_target;

const ENTITIES: [(&str, char); 5] = [
    ("&amp;", '&'),
    ("&lt;", '<'),
    ("&gt;", '>'),
    ("&apos;", '\''),
    ("&quot;", '"'),
];

fn check_escape(text: &str) {
    let escaped = xml::escape(text);
    assert!(
        !escaped.contains(['<', '>', '\'', '"']),
        "unescaped markup in {escaped:?} from {text:?}"
    );
    assert!(
        !escaped
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')),
        "control character in {escaped:?} from {text:?}"
    );

    let mut unescaped = String::with_capacity(escaped.len());
    let mut rest = escaped.as_str();
    while let Some(amp) = rest.find('&') {
        unescaped.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some((entity, c)) = ENTITIES.iter().find(|(entity, _)| rest.starts_with(entity)) else {
            panic!("bare `&` at {rest:?} in {escaped:?} from {text:?}");
        };
        unescaped.push(*c);
        rest = &rest[entity.len()..];
    }
    unescaped.push_str(rest);
    let expected: String = text
        .chars()
        .map(|c| {
            if c.is_control() && !matches!(c, '\t' | '\n' | '\r') {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect();
    assert_eq!(unescaped, expected, "escape does not round-trip");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_escape(text);

    if let Some(record) = xml::parse_metadata(text) {
        let owner = record
            .owner
            .as_deref()
            .map(|owner| format!("<hyperjob:owner>{}</hyperjob:owner>", xml::escape(owner)))
            .unwrap_or_default();
        let rendered = format!(
            "<hyperjob:job xmlns:hyperjob='{METADATA_NS}'><hyperjob:id>{}</hyperjob:id>\
             <hyperjob:created>{}</hyperjob:created><hyperjob:deadline>{}</hyperjob:deadline>\
             {owner}</hyperjob:job>",
            record.job_id, record.created_unix, record.deadline_unix
        );
        assert_eq!(xml::parse_metadata(&rendered), Some(record), "{text:?}");
    }
});
