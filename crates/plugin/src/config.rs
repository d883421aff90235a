//! The config helper: a plugin's table, as the TOML text hyperjob hands its factory, parsed into
//! the plugin's own serde type with errors of one line that name the key.
//!
//! hyperjob puts the file and the table in front of the message, so an operator reads
//! `config file /etc/hyperjob/config.toml [backends.mine]: `vcpus`: invalid type: string "two",
//! expected u32` — the same shape as the built-in plugins' errors.

use serde::de::DeserializeOwned;

use crate::plugin::PluginError;

/// Parses the TOML text of a plugin's config table (what the factory `export_plugin!` calls
/// receives) into `T`.
///
/// Give `T` `#[serde(deny_unknown_fields)]` so a misspelt key is an error, and make keys with a
/// default `Option`s or `#[serde(default)]`. Every error is [`PluginError::Config`], one line,
/// naming the key relative to the table (`` `port` ``, `` `disk.size` `` in a sub-table):
///
/// - an unknown key: ``unknown field `colour`, expected one of `vcpus`, `memory_mib` ``;
/// - a missing required key: `` `base_image` is required``;
/// - a value of the wrong type: `` `vcpus`: invalid type: string "two", expected u32``.
///
/// Check what serde cannot (ranges, absolute paths, combinations) after parsing, and report
/// it the same way: `PluginError::Config(format!("`vcpus` must be 1 to 64, not {n}"))`.
pub fn parse<T: DeserializeOwned>(table_text: &str) -> Result<T, PluginError> {
    toml::from_str(table_text).map_err(|err| PluginError::Config(describe(table_text, &err)))
}

/// The error as one line that names the key it is about.
fn describe(text: &str, err: &toml::de::Error) -> String {
    let message = one_line(err.message());
    if let Some(field) = backticked_after(&message, "missing field ") {
        let table = err
            .span()
            .and_then(|span| table_at(text, span.start))
            .map(|table| format!("{table}."))
            .unwrap_or_default();
        return format!("`{table}{field}` is required");
    }
    if message.starts_with("unknown field ") {
        return match err.span().and_then(|span| table_at(text, span.start)) {
            Some(table) => format!("in `{table}`: {message}"),
            None => message,
        };
    }
    match err.span().and_then(|span| key_at(text, span.start)) {
        Some(key) => format!("`{key}`: {message}"),
        None => message,
    }
}

/// The `` `name` `` right after `prefix` at the start of `message`.
fn backticked_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split('`').next()
}

/// The dotted path of the key whose line holds `offset`, with the sub-table it is in.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text.get(..offset)?.rfind('\n').map_or(0, |at| at + 1);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = unquote(key.trim());
    if key.is_empty() {
        return None;
    }
    Some(match table_at(text, offset) {
        Some(table) => format!("{table}.{key}"),
        None => key,
    })
}

/// The `[sub.table]` header above `offset`, if the offset is inside a sub-table.
fn table_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    before.lines().rev().find_map(|line| {
        let line = line.trim();
        let inner = line.strip_prefix('[')?.strip_suffix(']')?;
        let inner = inner.trim_start_matches('[').trim_end_matches(']');
        Some(
            inner
                .split('.')
                .map(|part| unquote(part.trim()))
                .collect::<Vec<_>>()
                .join("."),
        )
    })
}

fn unquote(key: &str) -> String {
    key.trim_matches(|c| c == '"' || c == '\'').to_string()
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        base_image: String,
        vcpus: Option<u32>,
        #[serde(default)]
        disk: Disk,
    }

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Disk {
        size_gib: Option<u32>,
    }

    /// The message `parse::<Demo>` gives for `text`.
    fn error(text: &str) -> String {
        match parse::<Demo>(text).expect_err("invalid") {
            PluginError::Config(message) => message,
            other => panic!("not a config error: {other:?}"),
        }
    }

    #[test]
    fn a_valid_table_is_parsed() {
        let demo: Demo =
            parse("base_image = \"/b.qcow2\"\nvcpus = 2\n\n[disk]\nsize_gib = 8\n").expect("valid");

        assert_eq!(
            demo,
            Demo {
                base_image: "/b.qcow2".to_string(),
                vcpus: Some(2),
                disk: Disk { size_gib: Some(8) },
            }
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_the_keys_it_could_have_been() {
        assert_eq!(
            error("base_image = \"/b\"\ncolour = \"blue\"\n"),
            "unknown field `colour`, expected one of `base_image`, `vcpus`, `disk`"
        );
    }

    #[test]
    fn an_unknown_key_in_a_sub_table_names_the_sub_table() {
        assert_eq!(
            error("base_image = \"/b\"\n\n[disk]\nsize = 8\n"),
            "in `disk`: unknown field `size`, expected `size_gib`"
        );
    }

    #[test]
    fn a_missing_required_key_is_named() {
        assert_eq!(error("vcpus = 2\n"), "`base_image` is required");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        assert_eq!(
            error("base_image = \"/b\"\nvcpus = \"two\"\n"),
            "`vcpus`: invalid type: string \"two\", expected u32"
        );
    }

    #[test]
    fn a_key_in_a_sub_table_is_named_with_its_table() {
        assert_eq!(
            error("base_image = \"/b\"\n\n[disk]\nsize_gib = -1\n"),
            "`disk.size_gib`: invalid value: integer `-1`, expected u32"
        );
    }

    #[test]
    fn every_error_is_one_line() {
        for text in [
            "base_image = \n",
            "base_image = \"/b\"\nvcpus = 2\nvcpus = 3\n",
            "[disk\n",
        ] {
            let message = error(text);

            assert!(!message.contains('\n'), "{text:?}: {message}");
            assert!(!message.is_empty(), "{text:?}");
        }
    }
}
