//! The runner's variable list (`Build.GetAllVariables`, protocol §3.3) and the
//! per-job settings it derives from variables (`GIT_STRATEGY`,
//! `GET_SOURCES_ATTEMPTS`, feature flags, …).

use std::collections::BTreeMap;

use crate::compat::{expand, path_join};
use crate::job::{Job, JobVariable};

/// Every feature flag of runner 19.4 with its default. The list is exported
/// (as `FF_*=true|false`) first in every job environment; the harness honours
/// only the defaults in script generation (see the crate docs).
pub const FEATURE_FLAGS: &[(&str, bool)] = &[
    ("FF_NETWORK_PER_BUILD", false),
    ("FF_USE_LEGACY_KUBERNETES_EXECUTION_STRATEGY", false),
    ("FF_USE_DIRECT_DOWNLOAD", true),
    ("FF_USE_FASTZIP", true),
    ("FF_DISABLE_UMASK_FOR_DOCKER_EXECUTOR", false),
    ("FF_ENABLE_BASH_EXIT_CODE_CHECK", false),
    ("FF_USE_WINDOWS_LEGACY_PROCESS_STRATEGY", false),
    ("FF_USE_LEGACY_BASH_EVAL", false),
    ("FF_USE_POWERSHELL_PATH_RESOLVER", false),
    ("FF_USE_DYNAMIC_TRACE_FORCE_SEND_INTERVAL", false),
    ("FF_SCRIPT_SECTIONS", false),
    ("FF_ENABLE_JOB_CLEANUP", false),
    ("FF_KUBERNETES_HONOR_ENTRYPOINT", false),
    ("FF_POSIXLY_CORRECT_ESCAPES", false),
    ("FF_RESOLVE_FULL_TLS_CHAIN", false),
    ("FF_DISABLE_POWERSHELL_STDIN", false),
    ("FF_USE_POD_ACTIVE_DEADLINE_SECONDS", true),
    ("FF_USE_ADVANCED_POD_SPEC_CONFIGURATION", false),
    ("FF_SECRET_RESOLVING_FAILS_IF_MISSING", true),
    ("FF_PRINT_POD_EVENTS", false),
    ("FF_USE_GIT_BUNDLE_URIS", true),
    ("FF_USE_GIT_NATIVE_CLONE", false),
    ("FF_USE_DUMB_INIT_WITH_KUBERNETES_EXECUTOR", false),
    ("FF_USE_INIT_WITH_DOCKER_EXECUTOR", false),
    ("FF_LOG_IMAGES_CONFIGURED_FOR_JOB", false),
    ("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO", true),
    ("FF_CLEAN_UP_FAILED_CACHE_EXTRACT", false),
    ("FF_USE_WINDOWS_JOB_OBJECT", false),
    ("FF_TIMESTAMPS", true),
    ("FF_DISABLE_AUTOMATIC_TOKEN_ROTATION", false),
    ("FF_USE_LEGACY_GCS_CACHE_ADAPTER", false),
    ("FF_DISABLE_UMASK_FOR_KUBERNETES_EXECUTOR", false),
    ("FF_USE_LEGACY_S3_CACHE_ADAPTER", false),
    ("FF_GIT_URLS_WITHOUT_TOKENS", false),
    ("FF_WAIT_FOR_POD_TO_BE_REACHABLE", false),
    ("FF_MASK_ALL_DEFAULT_TOKENS", true),
    ("FF_EXPORT_HIGH_CARDINALITY_METRICS", false),
    ("FF_USE_FLEETING_ACQUIRE_HEARTBEATS", false),
    ("FF_USE_EXPONENTIAL_BACKOFF_STAGE_RETRY", true),
    ("FF_USE_ADAPTIVE_REQUEST_CONCURRENCY", true),
    ("FF_USE_GITALY_CORRELATION_ID", true),
    ("FF_USE_GIT_PROACTIVE_AUTH", false),
    ("FF_HASH_CACHE_KEYS", false),
    ("FF_ENABLE_JOB_INPUTS_INTERPOLATION", true),
    ("FF_USE_JOB_ROUTER", false),
    ("FF_SCRIPT_TO_STEP_MIGRATION", false),
    ("FF_USE_PARALLEL_CACHE_TRANSFER", false),
    ("FF_USE_PARALLEL_ARTIFACT_TRANSFER", false),
    ("FF_CONCRETE", false),
    ("FF_SUSPENDABLE_ENVIRONMENTS", false),
    ("FF_USE_NATIVE_CONTAINER_STOP", false),
];

/// Runner-side facts that feed the variable list (the `[[runners]]` entry
/// and the runner binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerIdentity {
    /// `CI_RUNNER_SHORT_TOKEN` (first 9 characters of the token after its
    /// prefix).
    pub short_token: String,
    /// `[[runners]] environment` entries, `KEY=VALUE`.
    pub environment: Vec<String>,
    /// `[runners.feature_flags]`; these win over job variables.
    pub feature_flags: Vec<(String, bool)>,
    pub concurrent_id: u32,
    pub concurrent_project_id: u32,
    pub version: String,
    pub revision: String,
    /// `CI_RUNNER_EXECUTABLE_ARCH`, e.g. `linux/amd64`.
    pub arch: String,
}

impl Default for RunnerIdentity {
    fn default() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Self {
            short_token: "harness01".to_owned(),
            environment: Vec::new(),
            feature_flags: Vec::new(),
            concurrent_id: 0,
            concurrent_project_id: 0,
            version: "19.4.0".to_owned(),
            revision: "d79f3e7b".to_owned(),
            arch: format!("{}/{arch}", std::env::consts::OS),
        }
    }
}

/// The builds directory (`CI_BUILDS_DIR`) and the project directory
/// (`CI_PROJECT_DIR`). Both are empty until the build is started, which is
/// why config_exec sees empty values on the first preparation attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildDirs {
    pub builds_dir: String,
    pub project_dir: String,
}

impl BuildDirs {
    /// `<project dir>.tmp` (`RUNNER_TEMP_PROJECT_DIR`).
    pub fn tmp_project_dir(&self) -> String {
        format!("{}.tmp", self.project_dir)
    }
}

/// `GIT_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitStrategy {
    Fetch,
    Clone,
    None,
    Empty,
}

/// `GIT_SUBMODULE_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmoduleStrategy {
    None,
    Normal,
    Recursive,
}

/// What the runner derives from variables (`common.BuildSettings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    pub debug_trace: bool,
    pub git_clone_path: String,
    pub git_strategy: GitStrategy,
    pub git_checkout: bool,
    pub submodule_strategy: SubmoduleStrategy,
    pub git_clean_flags: Vec<String>,
    pub git_fetch_flags: Vec<String>,
    pub git_lfs_skip_smudge: bool,
    pub get_sources_attempts: u32,
    pub after_script_ignore_errors: bool,
    pub feature_flags: BTreeMap<String, bool>,
    /// Problems the runner would print as "WARNING: …" at job start.
    pub errors: Vec<String>,
}

impl BuildSettings {
    pub fn flag(&self, name: &str) -> bool {
        self.feature_flags.get(name).copied().unwrap_or(false)
    }
}

/// Last value of `key` (the runner's `Variables.Value`).
pub fn value_of<'a>(variables: &'a [JobVariable], key: &str) -> Option<&'a str> {
    variables
        .iter()
        .rev()
        .find(|variable| variable.key == key)
        .map(|variable| variable.value.as_str())
}

/// The runner's `Variables.Get`: like [`value_of`], but a file variable
/// resolves to the path of its file under `RUNNER_TEMP_PROJECT_DIR`.
fn get_for_expansion(variables: &[JobVariable], key: &str) -> String {
    match variables.iter().rev().find(|variable| variable.key == key) {
        Some(variable) if variable.file => path_join(&[
            value_of(variables, "RUNNER_TEMP_PROJECT_DIR").unwrap_or(""),
            &variable.key,
        ]),
        Some(variable) => variable.value.clone(),
        None => String::new(),
    }
}

/// `$VAR` expansion of `text` against `variables`, as the runner does it.
pub fn expand_value(variables: &[JobVariable], text: &str) -> String {
    expand(text, &|name| get_for_expansion(variables, name))
}

/// `Variables.Expand`: every non-raw value expanded against the unexpanded list.
pub fn expand_all(variables: &[JobVariable]) -> Vec<JobVariable> {
    variables
        .iter()
        .map(|variable| {
            let mut expanded = variable.clone();
            if !variable.raw {
                expanded.value = expand_value(variables, &variable.value);
            }
            expanded
        })
        .collect()
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn is_feature_flag(key: &str) -> bool {
    FEATURE_FLAGS.iter().any(|(name, _)| *name == key)
}

fn runner_environment(identity: &RunnerIdentity) -> Vec<JobVariable> {
    identity
        .environment
        .iter()
        .filter_map(|entry| entry.split_once('='))
        .map(|(key, value)| {
            let mut variable = JobVariable::new(key, value);
            variable.internal = true;
            variable
        })
        .collect()
}

fn before_job(job: &Job, identity: &RunnerIdentity, dirs: &BuildDirs) -> Vec<JobVariable> {
    let mut list = Vec::new();
    if let Some(image) = &job.image {
        list.push(JobVariable::runner_internal("CI_JOB_IMAGE", image));
    }
    list.push(JobVariable::runner_internal(
        "CI_RUNNER_SHORT_TOKEN",
        &identity.short_token,
    ));
    list.extend(runner_environment(identity));
    list.extend([
        JobVariable::runner_internal("CI_BUILDS_DIR", &dirs.builds_dir),
        JobVariable::runner_internal("CI_PROJECT_DIR", &dirs.project_dir),
        JobVariable::runner_internal("CI_CONCURRENT_ID", &identity.concurrent_id.to_string()),
        JobVariable::runner_internal(
            "CI_CONCURRENT_PROJECT_ID",
            &identity.concurrent_project_id.to_string(),
        ),
        JobVariable::runner_internal("CI_SERVER", "yes"),
        JobVariable::runner_internal("CI_JOB_STATUS", "running"),
        JobVariable::runner_internal("CI_JOB_TIMEOUT", &job.effective_timeout_secs().to_string()),
    ]);
    list
}

fn after_job(
    identity: &RunnerIdentity,
    dirs: &BuildDirs,
    network_per_build: bool,
) -> Vec<JobVariable> {
    let mut list = vec![
        // The custom executor declares itself "shared".
        JobVariable::runner_internal("CI_SHARED_ENVIRONMENT", "true"),
        JobVariable::runner_internal("CI_RUNNER_VERSION", &identity.version),
        JobVariable::runner_internal("CI_RUNNER_REVISION", &identity.revision),
        JobVariable::runner_internal("CI_RUNNER_EXECUTABLE_ARCH", &identity.arch),
        JobVariable::runner_internal("RUNNER_TEMP_PROJECT_DIR", &dirs.tmp_project_dir()),
    ];
    if network_per_build {
        list.push(JobVariable::runner_internal(
            "CI_BUILD_NETWORK_NAME",
            &format!("runner-{}", identity.short_token),
        ));
    }
    list
}

fn resolve_feature_flags(
    identity: &RunnerIdentity,
    resolution: &[JobVariable],
    errors: &mut Vec<String>,
) -> BTreeMap<String, bool> {
    let mut flags = BTreeMap::new();
    for (name, default) in FEATURE_FLAGS {
        let configured = identity
            .feature_flags
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| *value);
        let value = match configured {
            Some(value) => value,
            None => {
                let raw = get_for_expansion(resolution, name);
                parse_go_bool(&raw).unwrap_or_else(|| {
                    errors.push(format!(
                        "{name}: could not parse feature flag, expected bool, got {raw}"
                    ));
                    *default
                })
            }
        };
        flags.insert((*name).to_owned(), value);
    }
    flags
}

fn setting_bool(
    resolution: &[JobVariable],
    name: &str,
    default: bool,
    errors: &mut Vec<String>,
) -> bool {
    match value_of(resolution, name).unwrap_or("") {
        "" => default,
        raw => parse_go_bool(raw).unwrap_or_else(|| {
            errors.push(format!(
                "{name}: expected bool got {raw:?}, using default value: {default}"
            ));
            default
        }),
    }
}

fn setting_flags(resolution: &[JobVariable], name: &str, default: &[&str]) -> Vec<String> {
    match value_of(resolution, name).unwrap_or("") {
        "" => default.iter().map(|flag| (*flag).to_owned()).collect(),
        "none" => Vec::new(),
        raw => raw.split_whitespace().map(str::to_owned).collect(),
    }
}

fn setting_attempts(resolution: &[JobVariable], name: &str, errors: &mut Vec<String>) -> u32 {
    let parsed = match value_of(resolution, name).unwrap_or("") {
        "" => 1,
        raw => raw.parse::<i64>().unwrap_or_else(|_| {
            errors.push(format!(
                "{name}: expected int got {raw:?}, using default value: 1"
            ));
            1
        }),
    };
    let clamped = parsed.clamp(1, 10);
    if clamped != parsed {
        errors.push(format!(
            "{name}: number of attempts out of the range [1, 10], clamping to: {clamped}"
        ));
    }
    u32::try_from(clamped).unwrap_or(1)
}

/// `Build.Settings()`: resolves feature flags (runner config > job variable >
/// default) and the variable-driven settings.
pub fn build_settings(job: &Job, identity: &RunnerIdentity, dirs: &BuildDirs) -> BuildSettings {
    let mut resolution: Vec<JobVariable> = FEATURE_FLAGS
        .iter()
        .map(|(name, default)| JobVariable::runner_internal(name, &default.to_string()))
        .collect();
    resolution.extend(before_job(job, identity, dirs));
    resolution.extend(job.payload_variables());
    resolution.extend(after_job(identity, dirs, false));
    let resolution = expand_all(&resolution);

    let mut errors = Vec::new();
    let default_strategy = if job.allow_git_fetch {
        GitStrategy::Fetch
    } else {
        GitStrategy::Clone
    };
    let git_strategy = match value_of(&resolution, "GIT_STRATEGY").unwrap_or("") {
        "" => default_strategy,
        "fetch" => GitStrategy::Fetch,
        "clone" => GitStrategy::Clone,
        "none" => GitStrategy::None,
        "empty" => GitStrategy::Empty,
        other => {
            errors.push(format!(
                "GIT_STRATEGY: expected either 'clone', 'fetch', 'none' or 'empty' got {other:?}"
            ));
            default_strategy
        }
    };
    let submodule_strategy = match value_of(&resolution, "GIT_SUBMODULE_STRATEGY").unwrap_or("") {
        "" | "none" => SubmoduleStrategy::None,
        "normal" => SubmoduleStrategy::Normal,
        "recursive" => SubmoduleStrategy::Recursive,
        other => {
            errors.push(format!(
                "GIT_SUBMODULE_STRATEGY: expected either 'normal', 'recursive' or 'none' got {other:?}"
            ));
            SubmoduleStrategy::None
        }
    };
    let feature_flags = resolve_feature_flags(identity, &resolution, &mut errors);
    BuildSettings {
        debug_trace: setting_bool(&resolution, "CI_DEBUG_TRACE", false, &mut errors),
        git_clone_path: value_of(&resolution, "GIT_CLONE_PATH")
            .unwrap_or("")
            .to_owned(),
        git_strategy,
        git_checkout: setting_bool(&resolution, "GIT_CHECKOUT", true, &mut errors),
        submodule_strategy,
        git_clean_flags: setting_flags(&resolution, "GIT_CLEAN_FLAGS", &["-ffdx"]),
        git_fetch_flags: setting_flags(
            &resolution,
            "GIT_FETCH_EXTRA_FLAGS",
            &["--prune", "--quiet"],
        ),
        git_lfs_skip_smudge: setting_bool(&resolution, "GIT_LFS_SKIP_SMUDGE", false, &mut errors),
        get_sources_attempts: setting_attempts(&resolution, "GET_SOURCES_ATTEMPTS", &mut errors),
        after_script_ignore_errors: setting_bool(
            &resolution,
            "AFTER_SCRIPT_IGNORE_ERRORS",
            true,
            &mut errors,
        ),
        feature_flags,
        errors,
    }
}

/// `Build.GetAllVariables()`: resolved feature flags, runner variables, the
/// job's variables (without `FF_*`), then the trailing runner variables; all
/// expanded.
pub fn all_variables(
    job: &Job,
    identity: &RunnerIdentity,
    dirs: &BuildDirs,
    settings: &BuildSettings,
) -> Vec<JobVariable> {
    let mut list: Vec<JobVariable> = FEATURE_FLAGS
        .iter()
        .map(|(name, _)| JobVariable::runner_internal(name, &settings.flag(name).to_string()))
        .collect();
    list.extend(before_job(job, identity, dirs));
    list.extend(
        job.payload_variables()
            .into_iter()
            .filter(|variable| !is_feature_flag(&variable.key)),
    );
    list.extend(after_job(
        identity,
        dirs,
        settings.flag("FF_NETWORK_PER_BUILD"),
    ));
    expand_all(&list)
}

/// `Variables.OverwriteKey`: replaces the first variable named `key`.
pub fn overwrite_first(variables: &mut [JobVariable], key: &str, value: &str) {
    if let Some(variable) = variables.iter_mut().find(|variable| variable.key == key) {
        *variable = JobVariable::new(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_with(variables: Vec<JobVariable>) -> Job {
        let mut job = Job::new(1, "g/p", "file:///srv/g/p.git", "abc", &["true"]);
        job.variables = variables;
        job
    }

    fn dirs() -> BuildDirs {
        BuildDirs {
            builds_dir: "/builds".to_owned(),
            project_dir: "/builds/g/p".to_owned(),
        }
    }

    fn all_for(job: &Job) -> Vec<JobVariable> {
        let identity = RunnerIdentity::default();
        let settings = build_settings(job, &identity, &dirs());
        all_variables(job, &identity, &dirs(), &settings)
    }

    fn keys(variables: &[JobVariable]) -> Vec<&str> {
        variables
            .iter()
            .map(|variable| variable.key.as_str())
            .collect()
    }

    #[test]
    fn all_variables_start_with_feature_flags_and_end_with_temp_project_dir() {
        let job = job_with(vec![JobVariable::new("MINE", "1")]);

        let variables = all_for(&job);

        let names = keys(&variables);
        assert_eq!(names.first().copied(), Some("FF_NETWORK_PER_BUILD"));
        assert_eq!(names.last().copied(), Some("RUNNER_TEMP_PROJECT_DIR"));
        let project_dir = names.iter().position(|key| *key == "CI_PROJECT_DIR");
        let mine = names.iter().position(|key| *key == "MINE");
        let shared = names.iter().position(|key| *key == "CI_SHARED_ENVIRONMENT");
        assert!(project_dir < mine && mine < shared, "{names:?}");
    }

    #[test]
    fn job_variable_references_are_expanded_but_raw_ones_are_not() {
        let job = job_with(vec![
            JobVariable::new("WHERE", "$CI_PROJECT_DIR/out"),
            JobVariable::raw("LITERAL", "$CI_PROJECT_DIR"),
        ]);

        let variables = all_for(&job);

        assert_eq!(value_of(&variables, "WHERE"), Some("/builds/g/p/out"));
        assert_eq!(value_of(&variables, "LITERAL"), Some("$CI_PROJECT_DIR"));
    }

    #[test]
    fn reference_to_file_variable_expands_to_its_path() {
        let job = job_with(vec![
            JobVariable::file("CERT", "content"),
            JobVariable::new("CERT_PATH", "${CERT}"),
        ]);

        let variables = all_for(&job);

        assert_eq!(
            value_of(&variables, "CERT_PATH"),
            Some("/builds/g/p.tmp/CERT")
        );
    }

    #[test]
    fn feature_flag_job_variable_changes_the_flag_and_is_not_repeated() {
        let job = job_with(vec![JobVariable::new("FF_SCRIPT_SECTIONS", "true")]);

        let variables = all_for(&job);

        let occurrences = keys(&variables)
            .iter()
            .filter(|key| **key == "FF_SCRIPT_SECTIONS")
            .count();
        assert_eq!(occurrences, 1);
        assert_eq!(value_of(&variables, "FF_SCRIPT_SECTIONS"), Some("true"));
    }

    #[test]
    fn runner_configured_feature_flag_wins_over_job_variable() {
        let job = job_with(vec![JobVariable::new("FF_SCRIPT_SECTIONS", "true")]);
        let identity = RunnerIdentity {
            feature_flags: vec![("FF_SCRIPT_SECTIONS".to_owned(), false)],
            ..RunnerIdentity::default()
        };

        let settings = build_settings(&job, &identity, &dirs());

        assert!(!settings.flag("FF_SCRIPT_SECTIONS"));
    }

    #[test]
    fn get_sources_attempts_is_clamped_to_ten() {
        let job = job_with(vec![JobVariable::new("GET_SOURCES_ATTEMPTS", "42")]);

        let settings = build_settings(&job, &RunnerIdentity::default(), &dirs());

        assert_eq!(settings.get_sources_attempts, 10);
        assert_eq!(settings.errors.len(), 1);
    }

    #[test]
    fn git_strategy_defaults_to_fetch_when_fetch_is_allowed() {
        let job = job_with(Vec::new());

        let settings = build_settings(&job, &RunnerIdentity::default(), &dirs());

        assert_eq!(settings.git_strategy, GitStrategy::Fetch);
        assert_eq!(settings.git_fetch_flags, vec!["--prune", "--quiet"]);
    }

    #[test]
    fn overwrite_first_replaces_only_the_first_occurrence() {
        let mut variables = vec![JobVariable::new("A", "1"), JobVariable::new("A", "2")];

        overwrite_first(&mut variables, "A", "x");

        assert_eq!(variables[0].value, "x");
        assert_eq!(variables[1].value, "2");
    }
}
