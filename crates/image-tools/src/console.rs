//! The guest's serial console as a backend shows it when a boot fails: the last lines of the
//! console log, without the terminal control sequences a guest prints.

use std::path::Path;

use hyperjob_plugin::PluginError;

/// Lines of the guest console a backend shows when a boot fails.
pub const TAIL_LINES: usize = 25;

/// The last [`TAIL_LINES`] non-blank lines of the console log at `path`, cleaned
/// ([`tail_lines`]): what [`hyperjob_plugin::Backend::console_tail`] returns.
pub fn tail_of_log(path: &Path) -> Result<String, PluginError> {
    let bytes = std::fs::read(path)
        .map_err(|err| PluginError::system(format!("cannot read {}", path.display()), err))?;
    Ok(tail_lines(&String::from_utf8_lossy(&bytes), TAIL_LINES))
}

/// The last `count` non-blank lines of `text`, in order, without terminal control sequences
/// (colours, cursor moves, titles) or any other control character.
pub fn tail_lines(text: &str, count: usize) -> String {
    let clean = strip_control(text);
    let lines: Vec<&str> = clean.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Removes ANSI escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL|ESC \\`, and two-byte
/// `ESC x`) and every control character except the newline.
fn strip_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    // Parameter and intermediate bytes, then one final byte.
                    while let Some(&c) = chars.peek() {
                        if ('\x20'..='\x3f').contains(&c) {
                            chars.next();
                        } else {
                            if ('@'..='~').contains(&c) {
                                chars.next();
                            }
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' || c == '\n' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' => out.push('\n'),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 coloured console lines with blank lines between them; line `n` is "line n".
    fn coloured_console() -> String {
        let mut text = String::from("\x1b]0;title\x07\x1b[2J\x1b[H");
        for n in 1..=40 {
            text.push_str(&format!("\x1b[0;32mline\x1b[0m {n}\x07\r\n"));
            if n % 10 == 0 {
                text.push_str("\n \t \n");
            }
        }
        text
    }

    #[test]
    fn tail_keeps_exactly_the_last_lines_in_order_without_control_sequences() {
        let text = coloured_console();

        let tail = tail_lines(&text, 25);

        let expected: Vec<String> = (16..=40).map(|n| format!("line {n}")).collect();
        assert_eq!(tail.lines().collect::<Vec<_>>(), expected);
        for dropped in 1..=15 {
            assert!(
                !tail.lines().any(|l| l == format!("line {dropped}")),
                "{tail}"
            );
        }
        assert!(
            !tail.contains(|c: char| c.is_control() && c != '\n'),
            "{tail:?}"
        );
        assert!(!tail.contains(['[', ']']), "{tail:?}");
    }

    #[test]
    fn tail_of_fewer_lines_keeps_them_all() {
        let text = "one\r\ntwo\n\x1b[1;31mthree\x1b[m\n\nfour\n";

        assert_eq!(tail_lines(text, 2), "three\nfour");
        assert_eq!(tail_lines(text, 10), "one\ntwo\nthree\nfour");
        assert_eq!(tail_lines(text, 0), "");
        assert_eq!(tail_lines("", 5), "");
    }

    #[test]
    fn tail_of_log_reads_the_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("vm.console.log");
        std::fs::write(&log, coloured_console()).expect("log");

        let tail = tail_of_log(&log).expect("tail");

        let expected: Vec<String> = (41 - TAIL_LINES..=40)
            .map(|n| format!("line {n}"))
            .collect();
        assert_eq!(tail.lines().collect::<Vec<_>>(), expected);
        let missing = dir.path().join("other.console.log");
        let err = tail_of_log(&missing).expect_err("missing");
        assert_eq!(
            err.to_string(),
            format!("cannot read {}", missing.display())
        );
    }
}
