//! The stage scripts the runner hands to run_exec (protocol §7): inner bodies
//! per stage (§7.2, §7.4–7.6) and the bash wrapper of runner 19.1+ or, on
//! request, of runners 17.4–19.0 (§7.1).

pub mod transfer;

pub use transfer::{Artifact, Cache};

use crate::compat::{path_join, UrlParts};
use crate::escape::{double_quote, go_quote, regexp_quote_meta, shell_escape};
use crate::job::{JobVariable, Step};
use crate::variables::{expand_value, BuildDirs, BuildSettings, GitStrategy, SubmoduleStrategy};

const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
const ANSI_RESET: &str = "\x1b[0;m";
const ANSI_CLEAR: &str = "\x1b[0K";
const TERM_TRAP: &str = "trap 'exit 1' TERM";
/// The 17.4–19.0 trap: unquoted, so it installs the handler `exit` for the
/// signals 1 (HUP) and TERM.
const TERM_TRAP_17_4: &str = "trap exit 1 TERM";
const GITLAB_ENV_FILE: &str = "gitlab_runner_env";
const EXTERNAL_GIT_CONFIG: &str = ".gitlab-runner.ext.conf";
const GLOBAL_GIT_CONFIG_SEED: &str = ".glr.gconf";
const BUILD_UID_GID_FILE: &str = ".gitlab-build-uid-gid";

/// A stage of the job script, i.e. one run_exec call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stage {
    PrepareScript,
    GetSources,
    ClearWorktree,
    RestoreCache,
    DownloadArtifacts,
    /// A payload step other than `after_script`, by its payload name
    /// (`script`, `release`, …).
    UserStep(String),
    AfterScript,
    ArchiveCache,
    ArchiveCacheOnFailure,
    UploadArtifactsOnSuccess,
    UploadArtifactsOnFailure,
    CleanupFileVariables,
}

impl Stage {
    /// The stage for a name as a driver receives it (`build_script`,
    /// `step_release`, `get_sources`, …).
    pub fn parse(driver_name: &str) -> Self {
        match driver_name {
            "prepare_script" => Self::PrepareScript,
            "get_sources" => Self::GetSources,
            "clear_worktree" => Self::ClearWorktree,
            "restore_cache" => Self::RestoreCache,
            "download_artifacts" => Self::DownloadArtifacts,
            "build_script" => Self::UserStep("script".to_owned()),
            "after_script" => Self::AfterScript,
            "archive_cache" => Self::ArchiveCache,
            "archive_cache_on_failure" => Self::ArchiveCacheOnFailure,
            "upload_artifacts_on_success" => Self::UploadArtifactsOnSuccess,
            "upload_artifacts_on_failure" => Self::UploadArtifactsOnFailure,
            "cleanup_file_variables" => Self::CleanupFileVariables,
            other => Self::UserStep(other.strip_prefix("step_").unwrap_or(other).to_owned()),
        }
    }

    /// The runner's internal stage name (`step_script` for the script step).
    pub fn internal_name(&self) -> String {
        match self {
            Self::PrepareScript => "prepare_script".to_owned(),
            Self::GetSources => "get_sources".to_owned(),
            Self::ClearWorktree => "clear_worktree".to_owned(),
            Self::RestoreCache => "restore_cache".to_owned(),
            Self::DownloadArtifacts => "download_artifacts".to_owned(),
            Self::UserStep(name) => format!("step_{}", name.to_lowercase()),
            Self::AfterScript => "after_script".to_owned(),
            Self::ArchiveCache => "archive_cache".to_owned(),
            Self::ArchiveCacheOnFailure => "archive_cache_on_failure".to_owned(),
            Self::UploadArtifactsOnSuccess => "upload_artifacts_on_success".to_owned(),
            Self::UploadArtifactsOnFailure => "upload_artifacts_on_failure".to_owned(),
            Self::CleanupFileVariables => "cleanup_file_variables".to_owned(),
        }
    }

    /// The name passed to run_exec as its last argument: `step_script` is
    /// still translated to `build_script` (§1.5).
    pub fn driver_name(&self) -> String {
        match self.internal_name().as_str() {
            "step_script" => "build_script".to_owned(),
            other => other.to_owned(),
        }
    }

    /// The section header the runner writes to the job log before the call.
    pub fn description(&self) -> String {
        match self {
            Self::PrepareScript => "Preparing environment".to_owned(),
            Self::GetSources => "Getting source from Git repository".to_owned(),
            Self::ClearWorktree => {
                "Deleting all tracked and untracked files due to source fetch failure".to_owned()
            }
            Self::RestoreCache => "Restoring cache".to_owned(),
            Self::DownloadArtifacts => "Downloading artifacts".to_owned(),
            Self::AfterScript => "Running after_script".to_owned(),
            Self::ArchiveCache => "Saving cache for successful job".to_owned(),
            Self::ArchiveCacheOnFailure => "Saving cache for failed job".to_owned(),
            Self::UploadArtifactsOnSuccess => "Uploading artifacts for successful job".to_owned(),
            Self::UploadArtifactsOnFailure => "Uploading artifacts for failed job".to_owned(),
            Self::CleanupFileVariables => {
                "Cleaning up project directory and file based variables".to_owned()
            }
            Self::UserStep(_) => {
                format!(
                    "Executing \"{}\" stage of the job script",
                    self.internal_name()
                )
            }
        }
    }
}

/// The shell dialect of the script (`shell` in config.toml or config_exec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptShell {
    Bash,
    Sh,
}

impl ScriptShell {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bash => "bash",
            Self::Sh => "sh",
        }
    }
}

/// Which runner versions' wrapper (§7.1) the scripts get. The inner bodies are
/// always today's (19.x).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ScriptFormat {
    /// 19.1 and later: `trap 'exit 1' TERM`, the `case "$(set -o)"` pipefail
    /// check, and `(trap 'exit 1' TERM; eval …) < /dev/null` (or `: | eval …`
    /// with `FF_USE_LEGACY_BASH_EVAL`). A terminated script exits with 1.
    #[default]
    Current,
    /// 17.4 – 19.0: `trap exit 1 TERM` (unquoted), `if set -o | grep pipefail
    /// …`, and `: | eval …` (`FF_USE_NEW_BASH_EVAL_STRATEGY` is not modelled:
    /// it was off by default). A terminated script exits with the status of the
    /// killed pipeline, e.g. 143.
    Runner17_4,
}

/// Runner hooks from `[[runners]]` spliced into the scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerHooks {
    pub pre_get_sources_script: Option<String>,
    pub post_get_sources_script: Option<String>,
    pub pre_build_script: Option<String>,
    pub post_build_script: Option<String>,
}

/// What get_sources needs to know about the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    /// `git_info.repo_url` as sent (credentials included for HTTP).
    pub repo_url: String,
    /// The runner's GitLab URL (`[[runners]] url`).
    pub server_url: String,
    pub token: String,
    pub git_ref: String,
    pub sha: String,
    pub refspecs: Vec<String>,
    pub depth: u32,
    pub correlation_id: String,
    /// `gitlab-runner <version> <os>/<arch>`.
    pub user_agent: String,
}

/// Everything the generator needs; the runner's `ShellScriptInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptContext {
    pub shell: ScriptShell,
    /// Whose wrapper: runner 19.1+ (default) or 17.4–19.0.
    pub format: ScriptFormat,
    /// `GetAllVariables()`, expanded, in order.
    pub variables: Vec<JobVariable>,
    pub dirs: BuildDirs,
    /// `hostname` from config_exec ("" when not given).
    pub hostname: String,
    /// Payload steps including `after_script`.
    pub steps: Vec<Step>,
    pub settings: BuildSettings,
    pub git: GitSource,
    pub hooks: RunnerHooks,
    /// The payload's `features.trace_sections`.
    pub trace_sections: bool,
    /// The job's name (the default cache key is `<name>/<ref>`).
    pub job_name: String,
    /// The build's cache dir: `cache_dir` (from config_exec or `[[runners]]`) joined with
    /// the project's unique dir, a path in the environment ("" = none).
    pub cache_dir: String,
    /// The payload's `cache` entries.
    pub cache: Vec<Cache>,
    /// The payload's `artifacts` entries.
    pub artifacts: Vec<Artifact>,
}

/// A stage the harness cannot generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedStage(pub String);

impl std::fmt::Display for UnsupportedStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnsupportedStage {}

/// Generates the complete script file for `stage`, or `Ok(None)` when the
/// runner would skip the stage without calling run_exec (its
/// `ErrSkipBuildStage`: no such step, empty after_script, nothing to cache).
pub fn generate_script(
    stage: &Stage,
    ctx: &ScriptContext,
) -> Result<Option<String>, UnsupportedStage> {
    let mut writer = ScriptWriter::new(ctx);
    if *stage == Stage::PrepareScript {
        writer.prepare_greeting(&ctx.hostname);
    }
    let body = match stage {
        Stage::PrepareScript => {
            write_prepare(&mut writer);
            true
        }
        Stage::GetSources => {
            write_get_sources(&mut writer, ctx)?;
            true
        }
        Stage::ClearWorktree => {
            write_clear_worktree(&mut writer, ctx);
            true
        }
        Stage::RestoreCache => transfer::write_restore_cache(&mut writer, ctx),
        Stage::ArchiveCache => transfer::write_archive_cache(&mut writer, ctx, true),
        Stage::ArchiveCacheOnFailure => transfer::write_archive_cache(&mut writer, ctx, false),
        Stage::UploadArtifactsOnSuccess => transfer::write_upload_artifacts(&mut writer, ctx, true),
        Stage::UploadArtifactsOnFailure => {
            transfer::write_upload_artifacts(&mut writer, ctx, false)
        }
        // No dependencies with artifacts: the runner skips the stage.
        Stage::DownloadArtifacts => false,
        Stage::UserStep(_) => write_user_step(&mut writer, ctx, stage),
        Stage::AfterScript => write_after_script(&mut writer, ctx),
        Stage::CleanupFileVariables => {
            write_cleanup(&mut writer, ctx);
            true
        }
    };
    Ok(body.then(|| writer.finish()))
}

/// The bash/sh wrapper (§7.1, runner 19.1+) around an already generated
/// inner body.
pub fn wrap_script(shell: ScriptShell, inner_body: &str, debug_trace: bool) -> String {
    wrap_script_as(ScriptFormat::Current, shell, inner_body, debug_trace)
}

/// [`wrap_script`] with the wrapper of the runner versions `format` stands for.
pub fn wrap_script_as(
    format: ScriptFormat,
    shell: ScriptShell,
    inner_body: &str,
    debug_trace: bool,
) -> String {
    assemble_script(format, shell, &shell_escape(inner_body), debug_trace, false)
}

/// `BashWriter.Finish`: shebang, TERM trap, errexit/pipefail, then the
/// escaped body evaluated in a subshell with stdin from /dev/null
/// (`FF_USE_LEGACY_BASH_EVAL` restores `: | eval …`); for 17.4–19.0 the
/// older trap, pipefail check and `: | eval …`.
fn assemble_script(
    format: ScriptFormat,
    shell: ScriptShell,
    escaped_body: &str,
    debug_trace: bool,
    legacy_eval: bool,
) -> String {
    let trap = match format {
        ScriptFormat::Current => TERM_TRAP,
        ScriptFormat::Runner17_4 => TERM_TRAP_17_4,
    };
    let mut out = format!("#!/usr/bin/env {}\n\n{trap}\n\n", shell.name());
    if debug_trace {
        out.push_str("set -o xtrace\n");
    }
    out.push_str(match format {
        ScriptFormat::Current => {
            "case \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\n"
        }
        ScriptFormat::Runner17_4 => {
            "if set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit\n"
        }
    });
    out.push_str("set +o noclobber\n");
    if legacy_eval || format == ScriptFormat::Runner17_4 {
        out.push_str(&format!(": | eval {escaped_body}\n"));
    } else {
        out.push_str(&format!("({TERM_TRAP}; eval {escaped_body}) < /dev/null\n"));
    }
    out.push_str("exit 0\n");
    out
}

/// GitLab Runner's `PosixShellEscape` (used with FF_POSIXLY_CORRECT_ESCAPES).
fn posix_shell_escape(input: &str) -> String {
    if input.is_empty() {
        return "''".to_owned();
    }
    let mut body = String::with_capacity(input.len() * 2);
    let mut needs_quotes = false;
    for ch in input.chars() {
        match ch {
            '`' | '"' | '\\' | '$' => {
                body.push('\\');
                body.push(ch);
                needs_quotes = true;
            }
            ' ' | '!' | '#' | '%' | '&' | '(' | ')' | '*' | '<' | '=' | '>' | '?' | '[' | '|' => {
                body.push(ch);
                needs_quotes = true;
            }
            other => body.push(other),
        }
    }
    if needs_quotes {
        format!("\"{body}\"")
    } else {
        body
    }
}

/// The runner's `BashWriter`: accumulates the inner body line by line.
struct ScriptWriter {
    body: String,
    indent: usize,
    tmp_dir: String,
    shell: ScriptShell,
    format: ScriptFormat,
    debug_trace: bool,
    check_for_errors: bool,
    legacy_eval: bool,
    posix_escape: bool,
}

impl ScriptWriter {
    fn new(ctx: &ScriptContext) -> Self {
        Self {
            body: String::new(),
            indent: 0,
            tmp_dir: ctx.dirs.tmp_project_dir(),
            shell: ctx.shell,
            format: ctx.format,
            debug_trace: ctx.settings.debug_trace,
            check_for_errors: ctx.settings.flag("FF_ENABLE_BASH_EXIT_CODE_CHECK"),
            legacy_eval: ctx.settings.flag("FF_USE_LEGACY_BASH_EVAL"),
            posix_escape: ctx.settings.flag("FF_POSIXLY_CORRECT_ESCAPES"),
        }
    }

    fn escape(&self, text: &str) -> String {
        if self.posix_escape {
            posix_shell_escape(text)
        } else {
            shell_escape(text)
        }
    }

    fn line(&mut self, text: &str) {
        for _ in 0..self.indent {
            self.body.push_str("  ");
        }
        self.body.push_str(text);
        self.body.push('\n');
    }

    fn check_errors(&mut self) {
        if self.check_for_errors {
            self.line("_runner_exit_code=$?; if [ $_runner_exit_code -ne 0 ]; then exit $_runner_exit_code; fi");
        }
    }

    fn build_command(
        &self,
        quote: &dyn Fn(&Self, &str) -> String,
        command: &str,
        args: &[&str],
    ) -> String {
        let mut words = vec![self.escape(command)];
        words.extend(args.iter().map(|arg| quote(self, arg)));
        words.join(" ")
    }

    /// Every word shell-escaped.
    fn command(&mut self, command: &str, args: &[&str]) {
        let line = self.build_command(&|writer, arg| writer.escape(arg), command, args);
        self.line(&line);
        self.check_errors();
    }

    /// Arguments in plain double quotes (`$VAR` expands).
    fn command_arg_expand(&mut self, command: &str, args: &[&str]) {
        let line = self.build_command(&|_, arg| double_quote(arg), command, args);
        self.line(&line);
        self.check_errors();
    }

    fn command_with_stdin_best_effort(&mut self, stdin: &str, command: &str, args: &[&str]) {
        let producer = self.build_command(&|writer, arg| writer.escape(arg), "echo", &[stdin]);
        let consumer = self.build_command(&|writer, arg| writer.escape(arg), command, args);
        self.line(&format!("{producer} | {consumer} || true"));
    }

    fn tmp_file(&self, name: &str) -> String {
        absolute(&path_join(&[&self.tmp_dir, name]))
    }

    fn variable(&mut self, variable: &JobVariable) {
        if variable.file {
            let file = self.tmp_file(&variable.key);
            let tmp_dir = go_quote(&self.tmp_dir);
            self.line(&format!("mkdir -p {tmp_dir}"));
            let content = self.escape(&variable.value);
            self.line(&format!("printf '%s' {content} > {}", go_quote(&file)));
            let key = self.escape(&variable.key);
            self.line(&format!("export {key}={}", go_quote(&file)));
        } else {
            let value = if variable.value.starts_with(&self.tmp_dir) {
                absolute(&variable.value)
            } else {
                variable.value.clone()
            };
            let line = format!(
                "export {}={}",
                self.escape(&variable.key),
                self.escape(&value)
            );
            self.line(&line);
        }
    }

    fn plain_variable(&mut self, key: &str, value: &str) {
        self.variable(&JobVariable::new(key, value));
    }

    fn export_raw(&mut self, key: &str, value: &str) {
        let line = format!("export {}={}", self.escape(key), double_quote(value));
        self.line(&line);
    }

    fn source_env(&mut self, path: &str) {
        let tmp_dir = go_quote(&self.tmp_dir);
        self.line(&format!("mkdir -p {tmp_dir}"));
        self.line(&format!("touch {}", go_quote(path)));
        self.line(&format!(
            "while read -r line; do export \"$line\"; done < {}",
            go_quote(path)
        ));
    }

    fn if_directory(&mut self, path: &str) {
        self.line(&format!("if [ -d {} ]; then", go_quote(path)));
        self.indent += 1;
    }

    fn if_file(&mut self, path: &str) {
        self.line(&format!("if [ -e {} ]; then", go_quote(path)));
        self.indent += 1;
    }

    fn if_cmd(&mut self, command: &str, args: &[&str]) {
        let line = self.build_command(&|writer, arg| writer.escape(arg), command, args);
        self.line(&format!("if {line} >/dev/null 2>&1 ; then"));
        self.indent += 1;
    }

    fn else_branch(&mut self) {
        self.indent = self.indent.saturating_sub(1);
        self.line("else");
        self.indent += 1;
    }

    fn end_if(&mut self) {
        self.indent = self.indent.saturating_sub(1);
        self.line("fi");
    }

    fn cd(&mut self, path: &str) {
        self.command("cd", &[path]);
    }

    fn mkdir(&mut self, path: &str) {
        self.command("mkdir", &["-p", path]);
    }

    fn rm_file(&mut self, path: &str) {
        self.command_arg_expand("rm", &["-f", path]);
    }

    fn rm_dir(&mut self, path: &str) {
        self.if_directory(path);
        self.command_arg_expand("chmod", &["-R", "u+rwX", path]);
        self.end_if();
        self.command_arg_expand("rm", &["-r", "-f", path]);
    }

    fn rm_files_recursive(&mut self, path: &str, name: &str) {
        self.if_directory(path);
        self.line(&format!(
            "et='+' ; find /dev/null -exec true {{}} + 2>/dev/null || et=';' ; find {} -name {} -type f -exec rm -f {{}} \"${{et}}\"",
            go_quote(path),
            go_quote(name)
        ));
        self.end_if();
    }

    fn notice(&mut self, text: &str) {
        let line = format!(
            "echo {}",
            self.escape(&format!("{ANSI_BOLD_GREEN}{text}{ANSI_RESET}"))
        );
        self.line(&line);
    }

    fn empty_line(&mut self) {
        self.line("echo");
    }

    fn section_start(&mut self, id: &str, command: &str) {
        let header = self.escape(&format!("{ANSI_BOLD_GREEN}{command}{ANSI_RESET}"));
        self.line(&format!(
            "printf '%b\\n' section_start:$(awk 'BEGIN{{srand(); print srand()}}'):section_{id}[hide_duration=true,collapsed=true]\r{ANSI_CLEAR}{header}"
        ));
    }

    fn section_end(&mut self, id: &str) {
        self.line(&format!(
            "printf '%b\\n' section_end:$(awk 'BEGIN{{srand(); print srand()}}'):section_{id}\r{ANSI_CLEAR}"
        ));
    }

    fn prepare_greeting(&mut self, hostname: &str) {
        let text = if hostname.is_empty() {
            "Running on $(hostname)...".to_owned()
        } else {
            format!("Running on $(hostname) via {hostname}...")
        };
        self.line(&format!("echo {}", go_quote(&text)));
    }

    fn finish(self) -> String {
        let escaped_body = self.escape(&self.body);
        assemble_script(
            self.format,
            self.shell,
            &escaped_body,
            self.debug_trace,
            self.legacy_eval,
        )
    }
}

/// The runner's `BashWriter.Absolute`.
fn absolute(path: &str) -> String {
    if path.starts_with('/') || path.starts_with("$PWD") {
        path.to_owned()
    } else {
        path_join(&["$PWD", path])
    }
}

fn write_exports(writer: &mut ScriptWriter, ctx: &ScriptContext, env_only: bool) {
    for variable in &ctx.variables {
        if env_only && variable.file {
            let path = writer.tmp_file(&variable.key);
            writer.plain_variable(&variable.key, &path);
        } else {
            writer.variable(variable);
        }
    }
    let gitlab_env = writer.tmp_file(GITLAB_ENV_FILE);
    writer.plain_variable("GITLAB_ENV", &gitlab_env);
    writer.source_env(&gitlab_env);
}

fn write_commands(
    writer: &mut ScriptWriter,
    ctx: &ScriptContext,
    prefix: &str,
    commands: &[String],
) {
    let sections = ctx.settings.flag("FF_SCRIPT_SECTIONS") && ctx.trace_sections;
    for (index, command) in commands.iter().enumerate() {
        let command = command.trim();
        if command.is_empty() {
            writer.empty_line();
        } else if let Some((first_line, _)) = command.split_once('\n') {
            if sections {
                let id = format!("{prefix}_{index}");
                writer.section_start(&id, &format!("$ {command}"));
                writer.section_end(&id);
            } else {
                writer.notice(&format!("$ {first_line} # collapsed multi-line command"));
            }
        } else {
            writer.notice(&format!("$ {command}"));
        }
        writer.line(command);
        writer.check_errors();
    }
}

fn write_prepare(writer: &mut ScriptWriter) {
    let env_file = writer.tmp_file(GITLAB_ENV_FILE);
    writer.rm_file(&env_file);
    let masking_db = writer.tmp_file("masking.db");
    writer.rm_file(&masking_db);
}

fn write_hooks(
    writer: &mut ScriptWriter,
    ctx: &ScriptContext,
    prefix: &str,
    hook: Option<&String>,
) {
    let strategy = ctx.settings.git_strategy;
    let Some(script) = hook.filter(|script| !script.is_empty()) else {
        return;
    };
    if strategy == GitStrategy::None || strategy == GitStrategy::Empty {
        return;
    }
    write_commands(writer, ctx, prefix, std::slice::from_ref(script));
}

fn write_get_sources(
    writer: &mut ScriptWriter,
    ctx: &ScriptContext,
) -> Result<(), UnsupportedStage> {
    if ctx.settings.flag("FF_GIT_URLS_WITHOUT_TOKENS") {
        return Err(UnsupportedStage(
            "FF_GIT_URLS_WITHOUT_TOKENS=true is not supported by the harness".to_owned(),
        ));
    }
    if ctx.settings.submodule_strategy != SubmoduleStrategy::None {
        return Err(UnsupportedStage(
            "GIT_SUBMODULE_STRATEGY normal/recursive is not supported by the harness".to_owned(),
        ));
    }
    write_exports(writer, ctx, false);
    writer.plain_variable("GIT_TERMINAL_PROMPT", "0");
    writer.plain_variable("GCM_INTERACTIVE", "Never");
    write_hooks(
        writer,
        ctx,
        "pre_clone_script",
        ctx.hooks.pre_get_sources_script.as_ref(),
    );

    if !ctx.settings.git_lfs_skip_smudge {
        writer.plain_variable("GIT_LFS_SKIP_SMUDGE", "1");
    }
    write_strategy(writer, ctx);
    if ctx.settings.git_checkout
        && !matches!(
            ctx.settings.git_strategy,
            GitStrategy::None | GitStrategy::Empty
        )
    {
        write_checkout(writer, ctx);
        if !ctx.settings.git_lfs_skip_smudge {
            writer.if_cmd("git", &["lfs", "version"]);
            writer.command("git", &["lfs", "pull"]);
            writer.empty_line();
            writer.end_if();
        }
    } else {
        writer.notice("Skipping Git checkout");
    }
    writer.notice("Skipping Git submodules setup");
    write_hooks(
        writer,
        ctx,
        "post_clone_script",
        ctx.hooks.post_get_sources_script.as_ref(),
    );
    write_ownership_fix(writer, &ctx.dirs.builds_dir);
    write_clear_credentials(writer, ctx);
    Ok(())
}

fn write_strategy(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    let project_dir = ctx.dirs.project_dir.clone();
    match ctx.settings.git_strategy {
        GitStrategy::Fetch | GitStrategy::Clone => {
            write_git_cleanup(writer, ctx);
            let (template_dir, remote_url) = write_template_dir(writer, ctx);
            if ctx.settings.git_strategy == GitStrategy::Clone {
                writer.rm_dir(&project_dir);
            }
            write_fetch(writer, ctx, &template_dir, &remote_url);
        }
        GitStrategy::None => {
            writer.notice("Skipping Git repository setup");
            writer.mkdir(&project_dir);
        }
        GitStrategy::Empty => {
            writer.notice("Skipping Git repository setup and creating an empty build directory");
            writer.rm_dir(&project_dir);
            writer.mkdir(&project_dir);
        }
    }
}

fn write_git_cleanup(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    let git_dir = path_join(&[&ctx.dirs.project_dir, ".git"]);
    for file in [
        "index.lock",
        "shallow.lock",
        "HEAD.lock",
        "hooks/post-checkout",
        "config.lock",
    ] {
        writer.rm_file(&path_join(&[&git_dir, file]));
    }
    writer.rm_files_recursive(&path_join(&[&git_dir, "refs"]), "*.lock");
    // Config clean-up is on for the custom executor unless GIT_STRATEGY=none.
    if ctx.settings.git_strategy == GitStrategy::None {
        return;
    }
    let template_dir = writer.tmp_file("git-template");
    for dir in [template_dir, git_dir] {
        writer.rm_file(&path_join(&[&dir, "config"]));
        writer.rm_dir(&path_join(&[&dir, "hooks"]));
    }
}

/// The `insteadOf` pairs (URL with credentials, URL without) the runner
/// writes into the external git config.
fn instead_ofs(git: &GitSource) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    if let Some(repo) = UrlParts::parse(&git.repo_url) {
        let without = repo.with_userinfo(None).to_string();
        if without != git.repo_url {
            pairs.push((git.repo_url.clone(), without));
        }
    }
    let credentials = format!("gitlab-ci-token:{}", git.token);
    if let Some(base) = UrlParts::parse(&git.server_url).filter(UrlParts::is_http) {
        let authed = base.with_userinfo(Some(&credentials));
        pairs.push((authed.to_trimmed_string(), base.to_trimmed_string()));
        if let Some(repo) = UrlParts::parse(&git.repo_url).filter(UrlParts::is_http) {
            let repo_base = repo.without_path();
            pairs.push((
                repo_base
                    .with_userinfo(Some(&credentials))
                    .to_trimmed_string(),
                repo_base.with_userinfo(None).to_trimmed_string(),
            ));
        }
    }
    let mut unique: Vec<(String, String)> = Vec::new();
    for pair in pairs {
        if !unique.contains(&pair) {
            unique.push(pair);
        }
    }
    unique
}

fn remote_url_without_credentials(repo_url: &str) -> String {
    UrlParts::parse(repo_url).map_or_else(
        || repo_url.to_owned(),
        |url| url.with_userinfo(None).to_string(),
    )
}

fn write_template_dir(writer: &mut ScriptWriter, ctx: &ScriptContext) -> (String, String) {
    let template_dir = path_join(&[&writer.tmp_dir.clone(), "git-template"]);
    writer.mkdir(&template_dir);
    let template_file = path_join(&[&template_dir, "config"]);
    let ext_config = writer.tmp_file(EXTERNAL_GIT_CONFIG);
    for (key, value) in [
        ("init.defaultBranch", "none"),
        ("fetch.recurseSubmodules", "false"),
        ("credential.interactive", "never"),
        ("gc.autoDetach", "false"),
    ] {
        writer.command("git", &["config", "-f", &template_file, key, value]);
    }

    writer.rm_file(&ext_config);
    if ctx.settings.flag("FF_USE_GITALY_CORRELATION_ID") {
        let header = format!("X-Gitaly-Correlation-ID: {}", ctx.git.correlation_id);
        writer.command_arg_expand(
            "git",
            &["config", "-f", &ext_config, "http.extraHeader", &header],
        );
        writer.notice(&format!(
            "Gitaly correlation ID: {}",
            ctx.git.correlation_id
        ));
    }
    if ctx.settings.flag("FF_USE_GIT_BUNDLE_URIS") {
        writer.command_arg_expand(
            "git",
            &["config", "-f", &ext_config, "transfer.bundleURI", "true"],
        );
    }
    for (with_credentials, without) in instead_ofs(&ctx.git) {
        let stanza = format!("url.{with_credentials}.insteadOf");
        let pattern = format!("^{}$", regexp_quote_meta(&without));
        writer.command_arg_expand(
            "git",
            &[
                "config",
                "--file",
                &ext_config,
                "--replace-all",
                &stanza,
                &without,
                &pattern,
            ],
        );
    }

    let include_pattern = format!("{}$", regexp_quote_meta(EXTERNAL_GIT_CONFIG));
    writer.command_arg_expand(
        "git",
        &[
            "config",
            "--file",
            &template_file,
            "--replace-all",
            "include.path",
            &ext_config,
            &include_pattern,
        ],
    );
    writer.export_raw("GLR_EXT_GIT_CONFIG_PATH", &ext_config);
    (
        template_dir,
        remote_url_without_credentials(&ctx.git.repo_url),
    )
}

fn write_fetch(
    writer: &mut ScriptWriter,
    ctx: &ScriptContext,
    template_dir: &str,
    remote_url: &str,
) {
    let project_dir = ctx.dirs.project_dir.clone();
    let depth = ctx.git.depth;
    if depth > 0 {
        writer.notice(&format!(
            "Fetching changes with git depth set to {depth}..."
        ));
    } else {
        writer.notice("Fetching changes...");
    }
    writer.command("git", &["init", &project_dir, "--template", template_dir]);
    writer.cd(&project_dir);
    writer.if_cmd("git", &["remote", "add", "origin", remote_url]);
    writer.notice("Created fresh repository.");
    writer.else_branch();
    writer.command("git", &["remote", "set-url", "origin", remote_url]);
    let include_pattern = format!("{}$", regexp_quote_meta(EXTERNAL_GIT_CONFIG));
    writer.command_arg_expand(
        "git",
        &[
            "config",
            "--file",
            ".git/config",
            "--replace-all",
            "include.path",
            "$GLR_EXT_GIT_CONFIG_PATH",
            &include_pattern,
        ],
    );
    writer.end_if();

    let user_agent = format!("http.userAgent={}", ctx.git.user_agent);
    let depth_text = depth.to_string();
    let mut args: Vec<&str> = vec![
        "-c",
        &user_agent,
        "fetch",
        "origin",
        "--no-recurse-submodules",
    ];
    args.extend(ctx.git.refspecs.iter().map(String::as_str));
    if depth > 0 {
        args.extend(["--depth", depth_text.as_str()]);
    }
    args.extend(ctx.settings.git_fetch_flags.iter().map(String::as_str));
    if depth > 0 {
        writer.command("git", &args);
    } else {
        let mut unshallow = args.clone();
        unshallow.push("--unshallow");
        writer.if_file(".git/shallow");
        writer.command("git", &unshallow);
        writer.else_branch();
        writer.command("git", &args);
        writer.end_if();
    }
}

fn write_checkout(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    let short_sha = ctx.git.sha.get(..8).unwrap_or(&ctx.git.sha);
    writer.notice(&format!(
        "Checking out {short_sha} as detached HEAD (ref is {})...",
        ctx.git.git_ref
    ));
    writer.command(
        "git",
        &[
            "-c",
            "submodule.recurse=false",
            "checkout",
            "-f",
            "-q",
            &ctx.git.sha,
        ],
    );
    if !ctx.settings.git_clean_flags.is_empty() {
        let mut args = vec!["clean"];
        args.extend(ctx.settings.git_clean_flags.iter().map(String::as_str));
        writer.command("git", &args);
    }
}

fn write_ownership_fix(writer: &mut ScriptWriter, builds_dir: &str) {
    let uid_gid_file = format!("{builds_dir}/{BUILD_UID_GID_FILE}");
    writer.if_file(&uid_gid_file);
    if !builds_dir.trim().is_empty() {
        writer.if_directory(builds_dir);
        writer.line(&format!(
            "chown -R \"$(stat -c '%u:%g' '{uid_gid_file}')\" '{builds_dir}'"
        ));
        writer.end_if();
    }
    writer.end_if();
}

fn write_clear_credentials(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    let Some(remote) = UrlParts::parse(&ctx.git.repo_url) else {
        return;
    };
    let scheme = remote.scheme.to_ascii_lowercase();
    if remote.host.is_empty() || !["http", "https", "ssh"].contains(&scheme.as_str()) {
        return;
    }
    let stdin = format!(
        "url={}://{}\nusername=gitlab-ci-token",
        remote.scheme, remote.host
    );
    writer.command_with_stdin_best_effort(&stdin, "git", &["credential", "reject"]);
}

fn write_clear_worktree(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    writer.notice("Deleting tracked and untracked files...");
    let project_dir = ctx.dirs.project_dir.clone();
    writer.if_directory(&project_dir);
    writer.cd(&project_dir);
    writer.command("git", &["rm", "-rf", "--ignore-unmatch", "--quiet", "."]);
    writer.command("git", &["clean", "-ffdx", "-q"]);
    writer.end_if();
}

fn write_user_step(writer: &mut ScriptWriter, ctx: &ScriptContext, stage: &Stage) -> bool {
    let wanted = stage.internal_name();
    let Some(step) = ctx.steps.iter().find(|step| {
        step.name != "after_script" && Stage::UserStep(step.name.clone()).internal_name() == wanted
    }) else {
        return false;
    };
    write_exports(writer, ctx, false);
    writer.cd(&ctx.dirs.project_dir);
    if let Some(pre) = ctx
        .hooks
        .pre_build_script
        .as_ref()
        .filter(|s| !s.is_empty())
    {
        write_commands(writer, ctx, "pre_build_script", std::slice::from_ref(pre));
    }
    let script: Vec<String> = if step.name == "release" {
        step.script
            .iter()
            .map(|line| expand_value(&ctx.variables, line))
            .collect()
    } else {
        step.script.clone()
    };
    write_commands(writer, ctx, "script_step", &script);
    if let Some(post) = ctx
        .hooks
        .post_build_script
        .as_ref()
        .filter(|s| !s.is_empty())
    {
        write_commands(writer, ctx, "post_build_script", std::slice::from_ref(post));
    }
    true
}

fn write_after_script(writer: &mut ScriptWriter, ctx: &ScriptContext) -> bool {
    let Some(step) = ctx
        .steps
        .iter()
        .find(|step| step.name == "after_script")
        .filter(|step| !step.script.is_empty())
    else {
        return false;
    };
    write_exports(writer, ctx, false);
    writer.cd(&ctx.dirs.project_dir);
    writer.notice("Running after script...");
    write_commands(writer, ctx, "after_script_step", &step.script);
    true
}

fn write_cleanup(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    write_exports(writer, ctx, true);
    write_clear_credentials(writer, ctx);
    for name in [
        GITLAB_ENV_FILE,
        "masking.db",
        EXTERNAL_GIT_CONFIG,
        GLOBAL_GIT_CONFIG_SEED,
    ] {
        let file = writer.tmp_file(name);
        writer.rm_file(&file);
    }
    for variable in ctx.variables.iter().filter(|variable| variable.file) {
        let file = writer.tmp_file(&variable.key);
        writer.rm_file(&file);
    }
    if ctx.settings.flag("FF_ENABLE_JOB_CLEANUP") {
        write_build_dir_cleanup(writer, ctx);
    }
    write_git_cleanup(writer, ctx);
    writer.rm_file(&path_join(&[&ctx.dirs.builds_dir, BUILD_UID_GID_FILE]));
}

fn write_build_dir_cleanup(writer: &mut ScriptWriter, ctx: &ScriptContext) {
    match ctx.settings.git_strategy {
        GitStrategy::Clone | GitStrategy::Empty => writer.rm_dir(&ctx.dirs.project_dir.clone()),
        GitStrategy::Fetch => {
            writer.cd(&ctx.dirs.project_dir.clone());
            if !ctx.settings.git_clean_flags.is_empty() {
                let mut args = vec!["clean"];
                args.extend(ctx.settings.git_clean_flags.iter().map(String::as_str));
                writer.command("git", &args);
            }
            writer.command("git", &["reset", "--hard"]);
        }
        GitStrategy::None => writer.notice("Skipping build directory cleanup step"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Job;
    use crate::variables::{build_settings, RunnerIdentity};

    const EXAMPLE_7_4: &str = include_str!("../testdata/protocol-7.4-build_script.sh");
    const EXAMPLE_7_5_BODY: &str = include_str!("../testdata/protocol-7.5-get_sources-body.sh");
    const TOKEN: &str = "glcbt-64_EXAMPLETOKEN";
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn example_job() -> Job {
        let repo_url =
            Job::gitlab_repo_url("https://gitlab.example.com", "mygroup/myproject", TOKEN);
        let mut job = Job::new(
            4242,
            "mygroup/myproject",
            &repo_url,
            SHA,
            &["echo \"hello $GREETING\"", "make test"],
        );
        job.token = TOKEN.to_owned();
        job
    }

    pub(crate) fn example_context(variables: Vec<JobVariable>) -> ScriptContext {
        let job = example_job();
        let dirs = BuildDirs {
            builds_dir: "/builds".to_owned(),
            project_dir: "/builds/mygroup/myproject".to_owned(),
        };
        ScriptContext {
            shell: ScriptShell::Bash,
            format: ScriptFormat::Current,
            variables,
            settings: build_settings(&job, &RunnerIdentity::default(), &dirs),
            dirs,
            hostname: String::new(),
            steps: job.payload_steps(),
            git: GitSource {
                repo_url: job.repo_url.clone(),
                server_url: "https://gitlab.example.com/".to_owned(),
                token: TOKEN.to_owned(),
                git_ref: "main".to_owned(),
                sha: SHA.to_owned(),
                refspecs: vec![
                    "+refs/pipelines/777:refs/pipelines/777".to_owned(),
                    "+refs/heads/main:refs/remotes/origin/main".to_owned(),
                ],
                depth: 20,
                correlation_id: "01JEXAMPLECORRELATION".to_owned(),
                user_agent: "gitlab-runner 19.4.0 linux/amd64".to_owned(),
            },
            hooks: RunnerHooks::default(),
            trace_sections: true,
            job_name: "test".to_owned(),
            cache_dir: "/cache/mygroup/myproject".to_owned(),
            cache: Vec::new(),
            artifacts: Vec::new(),
        }
    }

    fn example_7_4_variables() -> Vec<JobVariable> {
        let plain = [
            ("FF_NETWORK_PER_BUILD", "false"),
            ("CI_RUNNER_SHORT_TOKEN", "abc123def"),
            ("CI_BUILDS_DIR", "/builds"),
            ("CI_PROJECT_DIR", "/builds/mygroup/myproject"),
            ("CI_CONCURRENT_ID", "0"),
            ("CI_CONCURRENT_PROJECT_ID", "0"),
            ("CI_SERVER", "yes"),
            ("CI_JOB_STATUS", "running"),
            ("CI_JOB_TIMEOUT", "3600"),
            ("CI_JOB_ID", "4242"),
            ("CI_SERVER_URL", "https://gitlab.example.com"),
            ("GREETING", "it's me"),
            ("CI_SHARED_ENVIRONMENT", "true"),
            ("RUNNER_TEMP_PROJECT_DIR", "/builds/mygroup/myproject.tmp"),
        ];
        let mut variables: Vec<JobVariable> = plain
            .iter()
            .map(|(key, value)| JobVariable::new(key, value))
            .collect();
        variables.push(JobVariable::file("MY_FILE_VAR", "line1\nline2"));
        variables
    }

    #[test]
    fn build_script_matches_protocol_example_byte_for_byte() {
        let ctx = example_context(example_7_4_variables());

        let script = generate_script(&Stage::UserStep("script".to_owned()), &ctx)
            .expect("supported stage")
            .expect("script step exists");

        assert_eq!(script, EXAMPLE_7_4);
    }

    #[test]
    fn get_sources_body_matches_protocol_example_byte_for_byte() {
        let ctx = example_context(vec![JobVariable::new("CI_JOB_ID", "4242")]);

        let script = generate_script(&Stage::GetSources, &ctx)
            .expect("supported stage")
            .expect("get_sources is never skipped");

        assert_eq!(
            script,
            wrap_script(ScriptShell::Bash, EXAMPLE_7_5_BODY, false)
        );
    }

    #[test]
    fn wrapper_starts_with_shebang_trap_and_errexit_and_ends_with_exit_zero() {
        let script = wrap_script(ScriptShell::Sh, "true\n", false);

        assert_eq!(
            script,
            "#!/usr/bin/env sh\n\ntrap 'exit 1' TERM\n\ncase \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\nset +o noclobber\n(trap 'exit 1' TERM; eval $'true\\n') < /dev/null\nexit 0\n"
        );
    }

    #[test]
    fn runner_17_4_wrapper_has_the_unquoted_trap_grep_pipefail_and_piped_eval() {
        let script = wrap_script_as(ScriptFormat::Runner17_4, ScriptShell::Bash, "true\n", false);

        assert_eq!(
            script,
            "#!/usr/bin/env bash\n\ntrap exit 1 TERM\n\nif set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit\nset +o noclobber\n: | eval $'true\\n'\nexit 0\n"
        );
    }

    #[test]
    fn runner_17_4_format_changes_only_the_wrapper_of_a_stage() {
        let current = example_context(example_7_4_variables());
        let old = ScriptContext {
            format: ScriptFormat::Runner17_4,
            ..current.clone()
        };
        let stage = Stage::UserStep("script".to_owned());

        let current = generate_script(&stage, &current)
            .expect("ok")
            .expect("step");
        let old = generate_script(&stage, &old).expect("ok").expect("step");

        let body = |script: &str| {
            let start = script.find("eval $'").expect("eval");
            let end = script.rfind('\'').expect("quote");
            script[start..=end].to_owned()
        };
        assert_eq!(body(&old), body(&current));
        assert!(old.contains("\n: | eval $'"), "{old}");
        assert!(
            old.starts_with("#!/usr/bin/env bash\n\ntrap exit 1 TERM\n"),
            "{old}"
        );
    }

    #[test]
    fn debug_trace_adds_xtrace_before_errexit_line() {
        let script = wrap_script(ScriptShell::Bash, "true\n", true);

        assert!(
            script.contains("\n\nset -o xtrace\ncase \"$(set -o)\""),
            "{script}"
        );
    }

    #[test]
    fn prepare_script_greets_via_config_hostname_and_removes_two_files() {
        let mut ctx = example_context(Vec::new());
        ctx.hostname = "vm-4242".to_owned();

        let script = generate_script(&Stage::PrepareScript, &ctx)
            .expect("supported stage")
            .expect("never skipped");

        let body = "echo \"Running on $(hostname) via vm-4242...\"\nrm \"-f\" \"/builds/mygroup/myproject.tmp/gitlab_runner_env\"\nrm \"-f\" \"/builds/mygroup/myproject.tmp/masking.db\"\n";
        assert_eq!(script, wrap_script(ScriptShell::Bash, body, false));
    }

    #[test]
    fn after_script_is_skipped_when_the_job_has_none() {
        let ctx = example_context(Vec::new());

        let script = generate_script(&Stage::AfterScript, &ctx).expect("supported stage");

        assert_eq!(script, None);
    }

    #[test]
    fn release_step_is_named_step_release_and_its_lines_are_expanded() {
        let mut ctx = example_context(vec![JobVariable::new("TAG", "v1")]);
        ctx.steps
            .push(Step::new("release", &["release-cli create --tag $TAG"]));
        let stage = Stage::UserStep("release".to_owned());

        let script = generate_script(&stage, &ctx)
            .expect("supported stage")
            .expect("release step exists");

        assert_eq!(stage.driver_name(), "step_release");
        assert!(script.contains("release-cli create --tag v1"), "{script}");
    }

    #[test]
    fn script_step_is_sent_to_the_driver_as_build_script() {
        let stage = Stage::UserStep("script".to_owned());

        assert_eq!(stage.internal_name(), "step_script");
        assert_eq!(stage.driver_name(), "build_script");
        assert_eq!(
            stage.description(),
            "Executing \"step_script\" stage of the job script"
        );
    }

    #[test]
    fn parse_round_trips_every_driver_stage_name() {
        let names = [
            "prepare_script",
            "get_sources",
            "clear_worktree",
            "restore_cache",
            "download_artifacts",
            "build_script",
            "step_release",
            "after_script",
            "archive_cache",
            "archive_cache_on_failure",
            "upload_artifacts_on_success",
            "upload_artifacts_on_failure",
            "cleanup_file_variables",
        ];

        for name in names {
            assert_eq!(Stage::parse(name).driver_name(), name);
        }
    }

    #[test]
    fn multi_line_command_is_announced_as_collapsed() {
        let mut ctx = example_context(Vec::new());
        ctx.steps = vec![Step::new("script", &["echo one\necho two"])];

        let script = generate_script(&Stage::UserStep("script".to_owned()), &ctx)
            .expect("supported stage")
            .expect("script step exists");

        assert!(
            script.contains("$ echo one # collapsed multi-line command"),
            "{script}"
        );
    }

    #[test]
    fn cleanup_exports_file_variables_as_paths_and_removes_their_files() {
        let ctx = example_context(vec![JobVariable::file("MY_FILE_VAR", "secret content")]);

        let script = generate_script(&Stage::CleanupFileVariables, &ctx)
            .expect("supported stage")
            .expect("never skipped");

        assert!(
            script.contains("export MY_FILE_VAR=/builds/mygroup/myproject.tmp/MY_FILE_VAR\\n"),
            "{script}"
        );
        assert!(
            script.contains("rm \"-f\" \"/builds/mygroup/myproject.tmp/MY_FILE_VAR\"\\n"),
            "{script}"
        );
        assert!(!script.contains("secret content"), "{script}");
    }

    #[test]
    fn cache_and_artifact_stages_are_skipped() {
        let ctx = example_context(Vec::new());

        for stage in [
            Stage::RestoreCache,
            Stage::DownloadArtifacts,
            Stage::ArchiveCache,
            Stage::UploadArtifactsOnFailure,
        ] {
            assert_eq!(generate_script(&stage, &ctx), Ok(None), "{stage:?}");
        }
    }
}
