//! Quoting rules the runner uses when it writes bash scripts (protocol §7.3).
//!
//! Four quoters appear in the generated scripts, and each must be reproduced
//! exactly for the scripts to match the runner's byte for byte:
//! `ShellEscape` (ANSI-C `$'…'` quoting), Go's `%q` (`strconv.Quote`, used for
//! paths in `if [ -d %q ]`, `mkdir -p %q`, …), plain double quotes
//! (`CommandArgExpand`) and `regexp.QuoteMeta` (for `git config` value patterns).

/// How one byte is treated by [`shell_escape`].
enum ByteClass {
    /// Copied, and needs no quoting.
    Literal,
    /// Copied, but forces `$'…'` quoting.
    Quote,
    /// Replaced by a backslash escape; forces quoting.
    Escape(&'static str),
    /// Replaced by `\xHH`; forces quoting.
    Hex,
}

fn classify(byte: u8) -> ByteClass {
    match byte {
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b',' | b'-' | b'.' | b'/' | b'@' | b'_' => {
            ByteClass::Literal
        }
        b' ' | b'!' | b'"' | b'#' | b'$' | b'%' | b'&' | b'(' | b')' | b'*' | b'+' | b':'
        | b';' | b'<' | b'=' | b'>' | b'?' | b'[' | b']' | b'^' | b'`' | b'{' | b'|' | b'}'
        | b'~' => ByteClass::Quote,
        0x07 => ByteClass::Escape("\\a"),
        0x08 => ByteClass::Escape("\\b"),
        b'\t' => ByteClass::Escape("\\t"),
        b'\n' => ByteClass::Escape("\\n"),
        0x0b => ByteClass::Escape("\\v"),
        0x0c => ByteClass::Escape("\\f"),
        b'\r' => ByteClass::Escape("\\r"),
        b'\'' => ByteClass::Escape("\\'"),
        b'\\' => ByteClass::Escape("\\\\"),
        _ => ByteClass::Hex,
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// GitLab Runner's `helpers.ShellEscape`: the word unchanged when it only has
/// "safe" bytes, otherwise `$'…'` with C escapes and `\xHH` for every byte
/// outside printable ASCII. The empty string becomes `''`.
pub fn shell_escape(input: &str) -> String {
    if input.is_empty() {
        return "''".to_owned();
    }
    let mut body = String::with_capacity(input.len() * 2);
    let mut needs_quotes = false;
    for &byte in input.as_bytes() {
        match classify(byte) {
            ByteClass::Literal => body.push(char::from(byte)),
            ByteClass::Quote => {
                body.push(char::from(byte));
                needs_quotes = true;
            }
            ByteClass::Escape(escaped) => {
                body.push_str(escaped);
                needs_quotes = true;
            }
            ByteClass::Hex => {
                body.push_str("\\x");
                body.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
                body.push(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]));
                needs_quotes = true;
            }
        }
    }
    if needs_quotes {
        format!("$'{body}'")
    } else {
        body
    }
}

/// Go's `strconv.Quote` (the `%q` verb) for the strings the runner formats
/// with it: paths and the prepare_script greeting.
///
/// Printable characters are kept; `"` and `\` are escaped; C escapes for the
/// usual control characters; `\xHH` for other ASCII controls; `\uHHHH` or
/// `\UHHHHHHHH` for non-printable non-ASCII characters. "Printable" follows
/// Rust's notion (not control, not a non-ASCII space), which matches Go's
/// `unicode.IsPrint` for every path a test will use.
pub fn go_quote(input: &str) -> String {
    let mut out = String::with_capacity(input.len() + 2);
    out.push('"');
    for ch in input.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0b}' => out.push_str("\\v"),
            ' ' => out.push(' '),
            c if c.is_ascii() && c.is_ascii_control() => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if c.is_control() || c.is_whitespace() => {
                let code = u32::from(c);
                if code <= 0xffff {
                    out.push_str(&format!("\\u{code:04x}"));
                } else {
                    out.push_str(&format!("\\U{code:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The runner's `doubleQuote`: wraps the text in `"` without escaping anything,
/// so `$VAR` references are expanded by the shell (`CommandArgExpand`).
pub fn double_quote(input: &str) -> String {
    format!("\"{input}\"")
}

/// Go's `regexp.QuoteMeta`.
pub fn regexp_quote_meta(input: &str) -> String {
    let mut out = String::with_capacity(input.len() * 2);
    for ch in input.chars() {
        if "\\.+*?()|[]{}^$".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_escape_of_empty_string_is_two_single_quotes() {
        assert_eq!(shell_escape(""), "''");
    }

    #[test]
    fn shell_escape_keeps_safe_path_bare() {
        assert_eq!(shell_escape("/builds/a-b/c_d.e"), "/builds/a-b/c_d.e");
    }

    #[test]
    fn shell_escape_quotes_url_because_of_colon() {
        assert_eq!(shell_escape("https://x"), "$'https://x'");
    }

    #[test]
    fn shell_escape_escapes_single_quote_inside_ansi_c_quotes() {
        assert_eq!(shell_escape("it's me"), "$'it\\'s me'");
    }

    #[test]
    fn shell_escape_uses_c_escapes_for_control_characters() {
        assert_eq!(
            shell_escape("a\x07\x08\t\n\x0b\x0c\r\\b"),
            "$'a\\a\\b\\t\\n\\v\\f\\r\\\\b'"
        );
    }

    #[test]
    fn shell_escape_hex_escapes_non_ascii_bytes_in_lower_case() {
        assert_eq!(shell_escape("é"), "$'\\xc3\\xa9'");
    }

    #[test]
    fn shell_escape_hex_escapes_escape_character() {
        assert_eq!(shell_escape("\x1b[0;m"), "$'\\x1b[0;m'");
    }

    #[test]
    fn shell_escape_quotes_every_special_ascii_character() {
        for special in " !\"#$%&()*+:;<=>?[]^`{|}~".chars() {
            let word = format!("a{special}b");

            let escaped = shell_escape(&word);

            assert_eq!(escaped, format!("$'{word}'"), "for {special:?}");
        }
    }

    #[test]
    fn go_quote_escapes_quotes_and_backslashes_but_keeps_dollar() {
        assert_eq!(
            go_quote(r#"Running on $(hostname) "x" \ y"#),
            r#""Running on $(hostname) \"x\" \\ y""#
        );
    }

    #[test]
    fn go_quote_escapes_control_characters() {
        assert_eq!(go_quote("a\nb\x01"), "\"a\\nb\\x01\"");
    }

    #[test]
    fn regexp_quote_meta_escapes_dots_and_anchors() {
        assert_eq!(
            regexp_quote_meta("https://gitlab.example.com"),
            "https://gitlab\\.example\\.com"
        );
    }
}
