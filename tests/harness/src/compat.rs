//! Small re-implementations of Go standard-library behaviour the runner relies
//! on: `os.Expand`, `path.Clean`/`path.Join`, `time.Duration` formatting and
//! parsing, and just enough of `net/url` to split a repository URL.

use std::time::Duration;

/// Go's `os.Expand`, with the runner's mapping for the special names:
/// `$$` is a literal `$`, the positional/special parameters expand to "".
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> String) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut copied_until = 0;
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'$' && index + 1 < bytes.len() {
            out.push_str(&input[copied_until..index]);
            let (name, width) = shell_name(&input[index + 1..]);
            match name {
                None if width > 0 => {} // invalid syntax: Go eats the characters
                None => out.push('$'),
                Some(name) => out.push_str(&mapping(name, lookup)),
            }
            index += width;
            copied_until = index + 1;
        }
        index += 1;
    }
    out.push_str(&input[copied_until.min(input.len())..]);
    out
}

fn mapping(name: &str, lookup: &dyn Fn(&str) -> String) -> String {
    match name {
        "$" => "$".to_owned(),
        "*" | "#" | "@" | "!" | "?" | "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" => {
            String::new()
        }
        _ => lookup(name),
    }
}

fn is_shell_special(byte: u8) -> bool {
    matches!(
        byte,
        b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9'
    )
}

fn is_alnum(byte: u8) -> bool {
    byte == b'_' || byte.is_ascii_alphanumeric()
}

/// Go's `getShellName`: the name after a `$` and how many bytes it used.
fn shell_name(rest: &str) -> (Option<&str>, usize) {
    let bytes = rest.as_bytes();
    if bytes[0] == b'{' {
        if bytes.len() > 2 && is_shell_special(bytes[1]) && bytes[2] == b'}' {
            return (Some(&rest[1..2]), 3);
        }
        for (offset, &byte) in bytes.iter().enumerate().skip(1) {
            if byte == b'}' {
                if offset == 1 {
                    return (None, 2);
                }
                return (Some(&rest[1..offset]), offset + 1);
            }
        }
        return (None, 1);
    }
    if is_shell_special(bytes[0]) {
        return (Some(&rest[0..1]), 1);
    }
    let width = bytes.iter().take_while(|&&byte| is_alnum(byte)).count();
    if width == 0 {
        (None, 0)
    } else {
        (Some(&rest[..width]), width)
    }
}

/// Go's `path.Clean` for slash-separated paths.
pub fn path_clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Go's `path.Join`: joins the non-empty elements and cleans the result.
pub fn path_join(elements: &[&str]) -> String {
    let non_empty: Vec<&str> = elements
        .iter()
        .copied()
        .filter(|part| !part.is_empty())
        .collect();
    if non_empty.is_empty() {
        return String::new();
    }
    path_clean(&non_empty.join("/"))
}

/// Go's `time.Duration.String()` (e.g. `3s`, `1h0m0s`, `1.5s`, `250ms`).
pub fn format_go_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos, 1_000_000));
    }
    let total_seconds = nanos / 1_000_000_000;
    let sub_second = nanos % 1_000_000_000;
    let hours = total_seconds / 3600;
    let minutes = (total_seconds % 3600) / 60;
    let seconds_part = trim_fraction(
        (total_seconds % 60) * 1_000_000_000 + sub_second,
        1_000_000_000,
    );
    match (hours, minutes) {
        (0, 0) => format!("{seconds_part}s"),
        (0, _) => format!("{minutes}m{seconds_part}s"),
        _ => format!("{hours}h{minutes}m{seconds_part}s"),
    }
}

fn trim_fraction(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let fraction = value % unit;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = unit.to_string().len() - 1;
    let text = format!("{fraction:0digits$}");
    format!("{whole}.{}", text.trim_end_matches('0'))
}

/// Go's `time.ParseDuration` for non-negative durations (`90s`, `1h30m`,
/// `1.5h`, `250ms`). Returns `None` for malformed text, like Go's error.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let trimmed = text.strip_prefix('+').unwrap_or(text);
    if trimmed == "0" {
        return Some(Duration::ZERO);
    }
    if trimmed.is_empty() || trimmed.starts_with('-') {
        return None;
    }
    let mut rest = trimmed;
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|byte| byte.is_ascii_digit() || *byte == b'.')
            .count();
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .bytes()
            .take_while(|byte| !byte.is_ascii_digit() && *byte != b'.')
            .count();
        let unit_nanos = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_nanos += number * unit_nanos;
    }
    Some(Duration::from_nanos(total_nanos as u64))
}

/// The parts of a URL the runner looks at. Parsing is deliberately minimal:
/// `scheme://[user[:password]@]host[:port][/path]`; anything else has no host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    pub scheme: String,
    pub userinfo: Option<String>,
    pub host: String,
    pub path: String,
}

impl UrlParts {
    pub fn parse(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return None;
        }
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        let (userinfo, host) = match authority.rfind('@') {
            Some(at) => (Some(authority[..at].to_owned()), &authority[at + 1..]),
            None => (None, authority),
        };
        Some(Self {
            scheme: scheme.to_owned(),
            userinfo,
            host: host.to_owned(),
            path: path.to_owned(),
        })
    }

    pub fn is_http(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("http") || self.scheme.eq_ignore_ascii_case("https")
    }

    pub fn with_userinfo(&self, userinfo: Option<&str>) -> Self {
        Self {
            userinfo: userinfo.map(str::to_owned),
            ..self.clone()
        }
    }

    pub fn without_path(&self) -> Self {
        Self {
            path: String::new(),
            ..self.clone()
        }
    }

    /// `url.String()` with trailing slashes trimmed (the runner's `trimmed`).
    pub fn to_trimmed_string(&self) -> String {
        self.to_string().trim_end_matches('/').to_owned()
    }
}

impl std::fmt::Display for UrlParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(userinfo) = &self.userinfo {
            write!(f, "{userinfo}@")?;
        }
        write!(f, "{}{}", self.host, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> String {
        match name {
            "A" => "alpha".to_owned(),
            "B_2" => "beta".to_owned(),
            _ => String::new(),
        }
    }

    #[test]
    fn expand_replaces_plain_and_braced_references() {
        assert_eq!(expand("x $A ${B_2}y", &lookup), "x alpha betay");
    }

    #[test]
    fn expand_turns_double_dollar_into_one_dollar() {
        assert_eq!(expand("cost $$5", &lookup), "cost $5");
    }

    #[test]
    fn expand_keeps_trailing_and_lone_dollars() {
        assert_eq!(expand("a $ b $", &lookup), "a $ b $");
    }

    #[test]
    fn expand_eats_empty_braces_and_unclosed_brace() {
        assert_eq!(expand("a${}b ${x", &lookup), "ab x");
    }

    #[test]
    fn expand_maps_unknown_and_positional_names_to_empty() {
        assert_eq!(expand("[$NOPE][$1][$?]", &lookup), "[][][]");
    }

    #[test]
    fn path_join_cleans_like_go() {
        assert_eq!(path_join(&["/builds/", "/g/../p/"]), "/builds/p");
    }

    #[test]
    fn path_clean_of_relative_parent_keeps_dotdot() {
        assert_eq!(path_clean("../a/./b/"), "../a/b");
    }

    #[test]
    fn format_go_duration_matches_go_output() {
        assert_eq!(format_go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn parse_go_duration_accepts_compound_units() {
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
    }

    #[test]
    fn parse_go_duration_rejects_bare_numbers() {
        assert_eq!(parse_go_duration("30"), None);
    }

    #[test]
    fn url_parts_split_credentials_host_and_path() {
        let url = UrlParts::parse("https://gitlab-ci-token:t0k@gitlab.example.com/g/p.git")
            .expect("a valid URL");

        assert_eq!(url.userinfo.as_deref(), Some("gitlab-ci-token:t0k"));
        assert_eq!(url.host, "gitlab.example.com");
        assert_eq!(url.path, "/g/p.git");
    }

    #[test]
    fn url_parts_of_file_url_has_empty_host() {
        let url = UrlParts::parse("file:///srv/g/p.git").expect("a valid URL");

        assert_eq!(url.host, "");
        assert_eq!(url.path, "/srv/g/p.git");
    }
}
