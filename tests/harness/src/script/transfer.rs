//! The stages that run `gitlab-runner` inside the build environment (protocol §7.2, the
//! runner's `shells/abstract.go`): restore_cache (`cache-extractor`), archive_cache and
//! archive_cache_on_failure (`cache-archiver`), upload_artifacts_on_success and
//! upload_artifacts_on_failure (`artifacts-uploader`), each guarded by
//! `if gitlab-runner --version …` so that an environment without it only gets a warning.
//! Local caches only (no `[runners.cache]` server: no `--url`); no artifacts metadata.

use serde::Serialize;

use super::{write_exports, ScriptContext, ScriptWriter};
use crate::variables::expand_value;

const ANSI_YELLOW: &str = "\x1b[0;33m";
const ANSI_RESET: &str = "\x1b[0;m";
/// `info.RunnerCommand` of the custom executor.
const RUNNER_COMMAND: &str = "gitlab-runner";
/// `CACHE_REQUEST_TIMEOUT`'s default, in minutes.
const DEFAULT_CACHE_REQUEST_TIMEOUT: u32 = 10;

/// One `cache:` entry of the job payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cache {
    /// "" = `<job name>/<ref>`.
    pub key: String,
    pub untracked: bool,
    /// `pull-push` (default), `pull` or `push`.
    pub policy: String,
    pub paths: Vec<String>,
    /// `on_success` (default), `on_failure` or `always`.
    pub when: String,
    pub fallback_keys: Vec<String>,
}

impl Cache {
    /// A `pull-push`, `on_success` cache of `paths` under `key`.
    pub fn new(key: &str, paths: &[&str]) -> Self {
        Self {
            key: key.to_owned(),
            untracked: false,
            policy: "pull-push".to_owned(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            when: "on_success".to_owned(),
            fallback_keys: Vec::new(),
        }
    }

    fn pulls(&self) -> bool {
        matches!(self.policy.as_str(), "" | "pull" | "pull-push")
    }

    fn pushes(&self) -> bool {
        matches!(self.policy.as_str(), "" | "push" | "pull-push")
    }
}

/// One `artifacts:` entry of the job payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    pub name: String,
    pub untracked: bool,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    /// `on_success` (default), `on_failure` or `always`.
    pub when: String,
    pub artifact_type: String,
    pub artifact_format: String,
    pub expire_in: String,
}

impl Artifact {
    /// An `on_success` zip archive of `paths`.
    pub fn new(name: &str, paths: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            untracked: false,
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            exclude: Vec::new(),
            when: "on_success".to_owned(),
            artifact_type: "archive".to_owned(),
            artifact_format: "zip".to_owned(),
            expire_in: String::new(),
        }
    }
}

/// `When.ShouldCache` / `ArtifactWhen.OnSuccess|OnFailure`.
fn applies(when: &str, on_success: bool) -> bool {
    match when {
        "always" => true,
        "on_failure" => !on_success,
        _ => on_success,
    }
}

/// `--path … --untracked`, as `getArchiverArgs`.
fn archiver_args(paths: &[String], untracked: bool) -> Vec<String> {
    let mut args: Vec<String> = paths
        .iter()
        .flat_map(|path| ["--path".to_owned(), path.clone()])
        .collect();
    if untracked {
        args.push("--untracked".to_owned());
    }
    args
}

/// Lexical `filepath.Rel(base, target)` for absolute, clean paths.
fn relative(base: &str, target: &str) -> String {
    let base: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    let target: Vec<&str> = target.split('/').filter(|p| !p.is_empty()).collect();
    let common = base.iter().zip(&target).take_while(|(a, b)| a == b).count();
    let mut parts = vec![".."; base.len() - common];
    parts.extend(&target[common..]);
    if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    }
}

impl ScriptContext {
    /// `cacheFile`: the key and the archive's path relative to the project dir.
    fn cache_file(&self, user_key: &str) -> Option<(String, String)> {
        if self.cache_dir.is_empty() {
            return None;
        }
        let key = if user_key.is_empty() {
            format!("{}/{}", self.job_name, self.git.git_ref)
        } else {
            expand_value(&self.variables, user_key)
        };
        if key.is_empty() {
            return None;
        }
        let file = format!("{}/{key}/cache.zip", self.cache_dir.trim_end_matches('/'));
        Some((key.clone(), relative(&self.dirs.project_dir, &file)))
    }

    fn cache_timeout(&self) -> String {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == "CACHE_REQUEST_TIMEOUT")
            .and_then(|v| v.value.parse::<u32>().ok())
            .unwrap_or(DEFAULT_CACHE_REQUEST_TIMEOUT)
            .to_string()
    }

    fn job_id(&self) -> String {
        self.variables
            .iter()
            .find(|v| v.key == "CI_JOB_ID")
            .map(|v| v.value.clone())
            .unwrap_or_default()
    }
}

impl ScriptWriter {
    fn warning(&mut self, text: &str) {
        let line = format!(
            "echo {}",
            self.escape(&format!("{ANSI_YELLOW}{text}{ANSI_RESET}"))
        );
        self.line(&line);
    }

    /// `IfCmdWithOutput`: the command's output shows.
    fn if_cmd_with_output(&mut self, command: &str, args: &[String]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let line = self.build_command(&|writer, arg| writer.escape(arg), command, &args);
        self.line(&format!("if {line}; then"));
        self.indent += 1;
    }

    /// `guardRunnerCommand`.
    fn guard_runner_command(&mut self, action: &str, body: impl FnOnce(&mut Self)) {
        self.if_cmd(RUNNER_COMMAND, &["--version"]);
        body(self);
        self.else_branch();
        self.warning(&format!("Missing {RUNNER_COMMAND}. {action} is disabled."));
        self.end_if();
    }
}

/// restore_cache; `false` when no cache entry has paths (the runner skips the stage).
pub(super) fn write_restore_cache(writer: &mut ScriptWriter, ctx: &ScriptContext) -> bool {
    write_exports(writer, ctx, false);
    writer.cd(&ctx.dirs.project_dir);
    let mut skip = true;
    for cache in &ctx.cache {
        if archiver_args(&cache.paths, cache.untracked).is_empty() {
            continue;
        }
        skip = false;
        let Some((key, file)) = ctx.cache_file(&cache.key) else {
            writer.notice("Skipping cache extraction due to empty cache key");
            continue;
        };
        if !cache.pulls() {
            writer.notice(&format!("Not downloading cache {key} due to policy"));
            continue;
        }
        let args = vec![
            "cache-extractor".to_owned(),
            "--file".to_owned(),
            file,
            "--timeout".to_owned(),
            ctx.cache_timeout(),
        ];
        writer.guard_runner_command("Extracting cache", |writer| {
            writer.notice(&format!("Checking cache for {key}..."));
            writer.if_cmd_with_output(RUNNER_COMMAND, &args);
            writer.notice("Successfully extracted cache");
            writer.else_branch();
            writer.warning("Failed to extract cache");
            writer.end_if();
        });
    }
    !skip
}

/// archive_cache (`on_success`) or archive_cache_on_failure.
pub(super) fn write_archive_cache(
    writer: &mut ScriptWriter,
    ctx: &ScriptContext,
    on_success: bool,
) -> bool {
    write_exports(writer, ctx, false);
    writer.cd(&ctx.dirs.project_dir);
    let mut skip = true;
    for cache in ctx.cache.iter().filter(|c| applies(&c.when, on_success)) {
        let archiver = archiver_args(&cache.paths, cache.untracked);
        if archiver.is_empty() {
            continue;
        }
        skip = false;
        let Some((key, file)) = ctx.cache_file(&cache.key) else {
            writer.notice("Skipping cache archiving due to empty cache key");
            continue;
        };
        if !cache.pushes() {
            writer.notice(&format!("Not uploading cache {key} due to policy"));
            continue;
        }
        let mut args = vec![
            "cache-archiver".to_owned(),
            "--file".to_owned(),
            file,
            "--timeout".to_owned(),
            ctx.cache_timeout(),
        ];
        args.extend(archiver);
        writer.guard_runner_command("Creating cache", |writer| {
            writer.notice(&format!("Creating cache {key}..."));
            writer.if_cmd_with_output(RUNNER_COMMAND, &args);
            writer.notice("Created cache");
            writer.else_branch();
            writer.warning("Failed to create cache");
            writer.end_if();
        });
    }
    !skip
}

/// upload_artifacts_on_success or upload_artifacts_on_failure; skipped without a GitLab URL.
pub(super) fn write_upload_artifacts(
    writer: &mut ScriptWriter,
    ctx: &ScriptContext,
    on_success: bool,
) -> bool {
    if ctx.git.server_url.is_empty() {
        return false;
    }
    write_exports(writer, ctx, false);
    writer.cd(&ctx.dirs.project_dir);
    let mut skip = true;
    for artifact in ctx
        .artifacts
        .iter()
        .filter(|a| applies(&a.when, on_success))
    {
        let mut archiver = archiver_args(&artifact.paths, false);
        for path in &artifact.exclude {
            archiver.extend(["--exclude".to_owned(), path.clone()]);
        }
        if artifact.untracked {
            archiver.push("--untracked".to_owned());
        }
        if archiver.is_empty() {
            continue;
        }
        skip = false;
        let mut args = vec![
            "artifacts-uploader".to_owned(),
            "--url".to_owned(),
            ctx.git.server_url.clone(),
            "--token".to_owned(),
            ctx.git.token.clone(),
            "--id".to_owned(),
            ctx.job_id(),
        ];
        args.extend(archiver);
        for (flag, value) in [
            ("--name", &artifact.name),
            ("--expire-in", &artifact.expire_in),
            ("--artifact-format", &artifact.artifact_format),
            ("--artifact-type", &artifact.artifact_type),
        ] {
            if !value.is_empty() {
                args.extend([flag.to_owned(), value.clone()]);
            }
        }
        writer.guard_runner_command("Uploading artifacts", |writer| {
            writer.notice("Uploading artifacts...");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            writer.command(RUNNER_COMMAND, &args);
        });
    }
    !skip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_files_are_relative_to_the_project_dir() {
        assert_eq!(
            relative(
                "/home/ci/builds/group/p",
                "/home/ci/cache/group/p/test/main/cache.zip"
            ),
            "../../../cache/group/p/test/main/cache.zip"
        );
        assert_eq!(relative("/a/b", "/a/b"), ".");
        assert_eq!(relative("/a/b", "/a/b/c"), "c");
    }

    /// The inner body of `stage`'s script for `ctx`, or `None` when it is skipped.
    fn body(stage: &crate::Stage, ctx: &ScriptContext) -> Option<String> {
        let script = crate::generate_script(stage, ctx).expect("generated")?;
        let line = script
            .lines()
            .find(|line| line.starts_with("(trap 'exit 1' TERM; eval $'"))
            .expect("eval line");
        let quoted = &line["(trap 'exit 1' TERM; eval ".len()..line.len() - ") < /dev/null".len()];
        let output = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("printf %s {quoted}"))
            .output()
            .expect("bash");
        Some(String::from_utf8(output.stdout).expect("utf-8"))
    }

    #[test]
    fn stages_without_entries_are_skipped() {
        let ctx = crate::script::tests::example_context(Vec::new());

        for stage in [
            crate::Stage::RestoreCache,
            crate::Stage::ArchiveCache,
            crate::Stage::ArchiveCacheOnFailure,
            crate::Stage::UploadArtifactsOnSuccess,
            crate::Stage::UploadArtifactsOnFailure,
            crate::Stage::DownloadArtifacts,
        ] {
            assert_eq!(body(&stage, &ctx), None, "{stage:?}");
        }
    }

    #[test]
    fn cache_stages_call_the_guarded_archiver_and_extractor() {
        let mut ctx = crate::script::tests::example_context(Vec::new());
        ctx.cache = vec![Cache::new("", &["vendor/"])];

        let archive = body(&crate::Stage::ArchiveCache, &ctx).expect("archive_cache");
        let restore = body(&crate::Stage::RestoreCache, &ctx).expect("restore_cache");

        let file = "../../../cache/mygroup/myproject/test/main/cache.zip";
        assert!(archive.contains(&format!(
            "if gitlab-runner --version >/dev/null 2>&1 ; then\n  echo $'\\x1b[32;1mCreating cache test/main...\\x1b[0;m'\n  if gitlab-runner cache-archiver --file {file} --timeout 10 --path vendor/; then"
        )), "{archive}");
        assert!(archive.contains("Missing gitlab-runner. Creating cache is disabled."));
        assert!(
            restore.contains(&format!(
                "if gitlab-runner cache-extractor --file {file} --timeout 10; then"
            )),
            "{restore}"
        );
        assert_eq!(body(&crate::Stage::ArchiveCacheOnFailure, &ctx), None);
    }

    #[test]
    fn artifact_stages_upload_with_the_job_token_per_when() {
        let mut ctx = crate::script::tests::example_context(Vec::new());
        let mut on_failure = Artifact::new("logs", &["log.txt"]);
        on_failure.when = "on_failure".to_owned();
        ctx.artifacts = vec![Artifact::new("", &["out/", "a b.txt"]), on_failure];

        let success = body(&crate::Stage::UploadArtifactsOnSuccess, &ctx).expect("success");
        let failure = body(&crate::Stage::UploadArtifactsOnFailure, &ctx).expect("failure");

        assert!(
            success.contains(
                "gitlab-runner artifacts-uploader --url $'https://gitlab.example.com/' --token"
            ),
            "{success}"
        );
        assert!(
            success.contains(
                "--path out/ --path $'a b.txt' --artifact-format zip --artifact-type archive\n"
            ),
            "{success}"
        );
        assert!(!success.contains("log.txt"), "{success}");
        assert!(failure.contains("--path log.txt --name logs "), "{failure}");
        ctx.git.server_url = String::new();
        assert_eq!(body(&crate::Stage::UploadArtifactsOnSuccess, &ctx), None);
    }

    #[test]
    fn when_and_policy_select_entries() {
        assert!(applies("on_success", true) && !applies("on_success", false));
        assert!(applies("on_failure", false) && !applies("on_failure", true));
        assert!(applies("always", true) && applies("always", false));
        assert!(applies("", true));
        let mut cache = Cache::new("k", &["a"]);
        assert!(cache.pulls() && cache.pushes());
        cache.policy = "pull".to_owned();
        assert!(cache.pulls() && !cache.pushes());
    }
}
