//! config_exec's JSON (protocol §2, `api.ConfigExecOutput`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// `driver` of the config JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DriverInfo {
    pub name: Option<String>,
    pub version: Option<String>,
}

/// The config JSON. Absent and `null` keys are `None` (setting unchanged);
/// unknown keys are ignored; a wrong type is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ConfigOutput {
    pub driver: Option<DriverInfo>,
    pub hostname: Option<String>,
    pub builds_dir: Option<String>,
    pub cache_dir: Option<String>,
    pub builds_dir_is_shared: Option<bool>,
    pub job_env: Option<BTreeMap<String, String>>,
    pub shell: Option<String>,
}

/// Parses config_exec's whole stdout. Zero bytes mean "no overrides"
/// (`Ok(None)`); anything else must be exactly one JSON value of the right
/// shape — whitespace alone is an error, like Go's "unexpected end of JSON
/// input". The error text is the runner's "error while parsing JSON output: …".
pub fn parse_config_output(stdout: &[u8]) -> Result<Option<ConfigOutput>, String> {
    if stdout.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice::<ConfigOutput>(stdout)
        .map(Some)
        .map_err(|error| format!("error while parsing JSON output: {error}"))
}

/// The job-log line the runner prints after config_exec.
pub fn startup_message(driver: Option<&DriverInfo>) -> String {
    match driver {
        Some(DriverInfo {
            name: Some(name),
            version: Some(version),
        }) => format!("Using Custom executor with driver {name} {version}..."),
        Some(DriverInfo {
            name: Some(name),
            version: None,
        }) => format!("Using Custom executor with driver {name}..."),
        _ => "Using Custom executor...".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_output_means_no_overrides() {
        assert_eq!(parse_config_output(b""), Ok(None));
    }

    #[test]
    fn whitespace_only_output_is_an_error() {
        assert!(parse_config_output(b"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_ignored_and_null_leaves_setting_unset() {
        let parsed = parse_config_output(br#"{"future":1,"builds_dir":null,"hostname":"vm"}"#)
            .expect("valid JSON");

        let output = parsed.expect("overrides present");
        assert_eq!(output.builds_dir, None);
        assert_eq!(output.hostname.as_deref(), Some("vm"));
    }

    #[test]
    fn wrong_type_is_an_error() {
        assert!(parse_config_output(br#"{"builds_dir_is_shared":"true"}"#).is_err());
        assert!(parse_config_output(br#"{"job_env":{"A":1}}"#).is_err());
    }

    #[test]
    fn trailing_garbage_after_the_object_is_an_error() {
        assert!(parse_config_output(b"{} log line").is_err());
    }

    #[test]
    fn startup_message_names_driver_and_version() {
        let driver = DriverInfo {
            name: Some("hyperjob".to_owned()),
            version: Some("0.1.0".to_owned()),
        };

        assert_eq!(
            startup_message(Some(&driver)),
            "Using Custom executor with driver hyperjob 0.1.0..."
        );
    }

    #[test]
    fn startup_message_ignores_version_without_name() {
        let driver = DriverInfo {
            name: None,
            version: Some("0.1.0".to_owned()),
        };

        assert_eq!(startup_message(Some(&driver)), "Using Custom executor...");
    }
}
