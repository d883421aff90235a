//! The job as GitLab hands it to the runner, and its re-serialisation into
//! `JOB_RESPONSE_FILE` (protocol §3.4).

use serde::Serialize;

use crate::script::{Artifact, Cache};

/// One CI/CD variable (`spec.Variable`). `internal` marks runner-computed
/// variables; it is never serialised, exactly like the runner's `json:"-"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobVariable {
    pub key: String,
    pub value: String,
    pub public: bool,
    #[serde(skip)]
    pub internal: bool,
    pub file: bool,
    pub masked: bool,
    pub raw: bool,
}

impl JobVariable {
    /// A plain, non-public project variable.
    pub fn new(key: &str, value: &str) -> Self {
        Self {
            key: key.to_owned(),
            value: value.to_owned(),
            public: false,
            internal: false,
            file: false,
            masked: false,
            raw: false,
        }
    }

    /// A predefined variable as GitLab sends it (public).
    pub fn public(key: &str, value: &str) -> Self {
        Self {
            public: true,
            ..Self::new(key, value)
        }
    }

    /// A file-type variable: the value is the file's content.
    pub fn file(key: &str, content: &str) -> Self {
        Self {
            file: true,
            ..Self::new(key, content)
        }
    }

    /// A masked variable.
    pub fn masked(key: &str, value: &str) -> Self {
        Self {
            masked: true,
            ..Self::new(key, value)
        }
    }

    /// A variable whose value is not expanded.
    pub fn raw(key: &str, value: &str) -> Self {
        Self {
            raw: true,
            ..Self::new(key, value)
        }
    }

    pub(crate) fn runner_internal(key: &str, value: &str) -> Self {
        Self {
            public: true,
            internal: true,
            ..Self::new(key, value)
        }
    }
}

/// One entry of the payload's `steps` (`script`, `release`, …; the job's
/// `after_script` is kept separately in [`Job::after_script`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub script: Vec<String>,
}

impl Step {
    pub fn new(name: &str, script: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            script: script.iter().map(|line| (*line).to_owned()).collect(),
        }
    }
}

/// One `services:` entry (only what `CUSTOM_ENV_CI_JOB_SERVICES` exposes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub name: String,
    pub alias: String,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub variables: Vec<JobVariable>,
}

/// `git_info.ref_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefType {
    Branch,
    Tag,
}

impl RefType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Branch => "branch",
            Self::Tag => "tag",
        }
    }
}

/// A CI job as GitLab would send it. Build one with [`Job::new`] and adjust
/// the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub token: String,
    pub name: String,
    pub stage: String,
    pub pipeline_id: i64,
    pub project_id: i64,
    /// `group/project` (`job_info.project_full_path`, `CI_PROJECT_PATH`).
    pub project_path: String,
    /// GitLab's URL, e.g. `https://gitlab.example.com` (`CI_SERVER_URL`).
    pub server_url: String,
    /// `git_info.repo_url` exactly as GitLab sends it (an HTTP URL carries
    /// `gitlab-ci-token:<token>@`); a `file://` URL works for local tests.
    pub repo_url: String,
    pub git_ref: String,
    pub ref_type: RefType,
    pub sha: String,
    pub before_sha: String,
    /// `git_info.refspecs`. GitLab also sends `+refs/pipelines/<id>:…`, which a
    /// plain local repository does not have; [`Job::new`] leaves it out.
    pub refspecs: Vec<String>,
    pub depth: u32,
    /// Whether `fetch` is the default `GIT_STRATEGY` (else `clone`).
    pub allow_git_fetch: bool,
    pub image: Option<String>,
    pub services: Vec<Service>,
    /// Steps in payload order, `script` first (`release` etc. follow).
    pub steps: Vec<Step>,
    pub after_script: Vec<String>,
    /// Project/group/job variables (predefined `CI_*` ones are added by
    /// [`Job::payload_variables`], like GitLab does).
    pub variables: Vec<JobVariable>,
    /// `runner_info.timeout` in seconds (0 = the runner default, 7200).
    pub timeout_secs: u64,
    pub runner_id: i64,
    /// Sent by GitLab as a request header; shows up in get_sources.
    pub correlation_id: String,
    /// `cache:` entries (restore_cache, archive_cache*).
    pub cache: Vec<Cache>,
    /// `artifacts:` entries (upload_artifacts_*).
    pub artifacts: Vec<Artifact>,
}

impl Job {
    /// A job with one `script` step, sensible identifiers and a branch ref.
    pub fn new(id: i64, project_path: &str, repo_url: &str, sha: &str, script: &[&str]) -> Self {
        let git_ref = "main".to_owned();
        Self {
            id,
            token: format!("glcbt-64_harness-token-{id}"),
            name: "test".to_owned(),
            stage: "test".to_owned(),
            pipeline_id: 1000 + id,
            project_id: 12,
            project_path: project_path.to_owned(),
            server_url: "https://gitlab.example.com".to_owned(),
            repo_url: repo_url.to_owned(),
            refspecs: vec![Self::branch_refspec(&git_ref)],
            git_ref,
            ref_type: RefType::Branch,
            sha: sha.to_owned(),
            before_sha: "0000000000000000000000000000000000000000".to_owned(),
            depth: 20,
            allow_git_fetch: true,
            image: None,
            services: Vec::new(),
            steps: vec![Step::new("script", script)],
            after_script: Vec::new(),
            variables: Vec::new(),
            timeout_secs: 3600,
            runner_id: 7,
            correlation_id: format!("01HARNESSCORRELATION{id}"),
            cache: Vec::new(),
            artifacts: Vec::new(),
        }
    }

    /// `+refs/heads/<branch>:refs/remotes/origin/<branch>`.
    pub fn branch_refspec(branch: &str) -> String {
        format!("+refs/heads/{branch}:refs/remotes/origin/{branch}")
    }

    /// The HTTP repository URL GitLab sends, token included.
    pub fn gitlab_repo_url(server_url: &str, project_path: &str, token: &str) -> String {
        let (scheme, host) = server_url
            .trim_end_matches('/')
            .split_once("://")
            .unwrap_or(("https", server_url));
        format!("{scheme}://gitlab-ci-token:{token}@{host}/{project_path}.git")
    }

    /// Runner default when `runner_info.timeout` is not positive.
    pub fn effective_timeout_secs(&self) -> u64 {
        if self.timeout_secs == 0 {
            7200
        } else {
            self.timeout_secs
        }
    }

    fn project_name(&self) -> &str {
        self.project_path
            .rsplit_once('/')
            .map_or(self.project_path.as_str(), |(_, name)| name)
    }

    fn project_namespace(&self) -> &str {
        self.project_path
            .rsplit_once('/')
            .map_or("", |(namespace, _)| namespace)
    }

    /// `variables` of the payload: a representative set of GitLab's
    /// predefined variables derived from the fields above, then
    /// [`Job::variables`] in order.
    pub fn payload_variables(&self) -> Vec<JobVariable> {
        let server = self.server_url.trim_end_matches('/');
        let host = server.split_once("://").map_or(server, |(_, host)| host);
        let project_url = format!("{server}/{}", self.project_path);
        let mut token = JobVariable::public("CI_JOB_TOKEN", &self.token);
        token.masked = true;
        let mut list = vec![
            JobVariable::public("CI_PIPELINE_ID", &self.pipeline_id.to_string()),
            JobVariable::public(
                "CI_PIPELINE_URL",
                &format!("{project_url}/-/pipelines/{}", self.pipeline_id),
            ),
            JobVariable::public("CI_JOB_ID", &self.id.to_string()),
            JobVariable::public("CI_JOB_URL", &format!("{project_url}/-/jobs/{}", self.id)),
            token,
            JobVariable::public("CI_JOB_NAME", &self.name),
            JobVariable::public("CI_JOB_STAGE", &self.stage),
            JobVariable::public("CI_COMMIT_SHA", &self.sha),
            JobVariable::public(
                "CI_COMMIT_SHORT_SHA",
                self.sha.get(..8).unwrap_or(&self.sha),
            ),
            JobVariable::public("CI_COMMIT_BEFORE_SHA", &self.before_sha),
            JobVariable::public("CI_COMMIT_REF_NAME", &self.git_ref),
            JobVariable::public("CI_COMMIT_REF_SLUG", &slugify(&self.git_ref)),
        ];
        match self.ref_type {
            RefType::Branch => list.push(JobVariable::public("CI_COMMIT_BRANCH", &self.git_ref)),
            RefType::Tag => list.push(JobVariable::public("CI_COMMIT_TAG", &self.git_ref)),
        }
        list.extend([
            JobVariable::public("CI_PROJECT_ID", &self.project_id.to_string()),
            JobVariable::public("CI_PROJECT_NAME", self.project_name()),
            JobVariable::public("CI_PROJECT_NAMESPACE", self.project_namespace()),
            JobVariable::public("CI_PROJECT_PATH", &self.project_path),
            JobVariable::public("CI_PROJECT_PATH_SLUG", &slugify(&self.project_path)),
            JobVariable::public("CI_PROJECT_URL", &project_url),
            JobVariable::public("CI_REPOSITORY_URL", &self.repo_url),
            JobVariable::public("CI_SERVER_URL", server),
            JobVariable::public("CI_SERVER_HOST", host),
            JobVariable::public("CI_RUNNER_ID", &self.runner_id.to_string()),
            JobVariable::public("CI", "true"),
            JobVariable::public("GITLAB_CI", "true"),
        ]);
        list.extend(self.variables.iter().cloned());
        list
    }

    /// The payload steps, `after_script` included, as serialised to the
    /// response file and used by the script generator.
    pub fn payload_steps(&self) -> Vec<Step> {
        let mut steps = self.steps.clone();
        if !self.after_script.is_empty() {
            steps.push(Step {
                name: "after_script".to_owned(),
                script: self.after_script.clone(),
            });
        }
        steps
    }

    /// The object the runner writes to `JOB_RESPONSE_FILE` (every top-level
    /// key of §3.4, in the runner's encoding order).
    pub fn response_json(&self) -> serde_json::Value {
        let payload = ResponsePayload::from_job(self);
        serde_json::to_value(&payload).unwrap_or(serde_json::Value::Null)
    }

    /// The exact bytes of `JOB_RESPONSE_FILE`: one JSON object and a newline,
    /// keys in the runner's order.
    pub fn response_file_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut bytes = serde_json::to_vec(&ResponsePayload::from_job(self))?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// GitLab's slug rule: lower-case, non-alphanumerics become `-`, at most 63
/// bytes, no leading/trailing `-`.
fn slugify(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cut: String = lowered.chars().take(63).collect();
    cut.trim_matches('-').to_owned()
}

#[derive(Serialize)]
struct ResponsePayload<'a> {
    id: i64,
    token: &'a str,
    allow_git_fetch: bool,
    job_info: JobInfoJson<'a>,
    git_info: GitInfoJson<'a>,
    runner_info: RunnerInfoJson,
    inputs: serde_json::Map<String, serde_json::Value>,
    variables: Vec<JobVariable>,
    steps: Vec<StepJson>,
    image: ImageJson,
    services: Option<Vec<ImageJson>>,
    artifacts: Option<&'a [Artifact]>,
    cache: Option<&'a [Cache]>,
    credentials: Option<Vec<serde_json::Value>>,
    dependencies: Option<Vec<serde_json::Value>>,
    features: FeaturesJson,
    policy_options: PolicyOptionsJson,
    suspend_options: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct JobInfoJson<'a> {
    name: &'a str,
    stage: &'a str,
    pipeline_id: i64,
    project_id: i64,
    project_name: &'a str,
    project_full_path: &'a str,
    namespace_id: i64,
    root_namespace_id: i64,
    organization_id: i64,
    instance_id: &'a str,
    instance_uuid: &'a str,
    user_id: i64,
    time_in_queue_seconds: f64,
    project_jobs_running_on_instance_runners_count: &'a str,
    queue_size: i64,
    queue_depth: i64,
}

#[derive(Serialize)]
struct GitInfoJson<'a> {
    repo_url: &'a str,
    repo_object_format: &'a str,
    #[serde(rename = "ref")]
    git_ref: &'a str,
    sha: &'a str,
    before_sha: &'a str,
    ref_type: &'a str,
    refspecs: &'a [String],
    depth: u32,
    protected: Option<bool>,
}

#[derive(Serialize)]
struct RunnerInfoJson {
    uuid: String,
    timeout: u64,
}

#[derive(Serialize)]
struct StepJson {
    name: String,
    script: Vec<String>,
    timeout: u64,
    when: &'static str,
    allow_failure: bool,
}

#[derive(Serialize)]
struct ImageJson {
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    alias: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    variables: Vec<JobVariable>,
    executor_opts: ExecutorOptsJson,
}

#[derive(Serialize, Default)]
struct ExecutorOptsJson {
    docker: DockerOptsJson,
    kubernetes: KubernetesOptsJson,
}

#[derive(Serialize, Default)]
struct DockerOptsJson {
    platform: String,
    user: String,
}

#[derive(Serialize, Default)]
struct KubernetesOptsJson {
    user: String,
}

#[derive(Serialize)]
struct FeaturesJson {
    trace_sections: bool,
    token_mask_prefixes: Option<Vec<String>>,
    failure_reasons: Vec<&'static str>,
    tracing: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct PolicyOptionsJson {
    execution_policy_job: bool,
    policy_name: String,
}

impl<'a> ResponsePayload<'a> {
    fn from_job(job: &'a Job) -> Self {
        let timeout = job.effective_timeout_secs();
        let steps = job
            .payload_steps()
            .into_iter()
            .map(|step| StepJson {
                when: if step.name == "after_script" {
                    "always"
                } else {
                    "on_success"
                },
                name: step.name,
                script: step.script,
                timeout,
                allow_failure: false,
            })
            .collect();
        let services = if job.services.is_empty() {
            None
        } else {
            Some(
                job.services
                    .iter()
                    .map(|service| ImageJson {
                        name: service.name.clone(),
                        alias: service.alias.clone(),
                        command: service.command.clone(),
                        entrypoint: service.entrypoint.clone(),
                        variables: service.variables.clone(),
                        executor_opts: ExecutorOptsJson::default(),
                    })
                    .collect(),
            )
        };
        Self {
            id: job.id,
            token: &job.token,
            allow_git_fetch: job.allow_git_fetch,
            job_info: JobInfoJson {
                name: &job.name,
                stage: &job.stage,
                pipeline_id: job.pipeline_id,
                project_id: job.project_id,
                project_name: job.project_name(),
                project_full_path: &job.project_path,
                namespace_id: 0,
                root_namespace_id: 0,
                organization_id: 0,
                instance_id: "",
                instance_uuid: "",
                user_id: 0,
                time_in_queue_seconds: 0.0,
                project_jobs_running_on_instance_runners_count: "",
                queue_size: 0,
                queue_depth: 0,
            },
            git_info: GitInfoJson {
                repo_url: &job.repo_url,
                repo_object_format: "sha1",
                git_ref: &job.git_ref,
                sha: &job.sha,
                before_sha: &job.before_sha,
                ref_type: job.ref_type.as_str(),
                refspecs: &job.refspecs,
                depth: job.depth,
                protected: Some(false),
            },
            runner_info: RunnerInfoJson {
                uuid: String::new(),
                timeout,
            },
            inputs: serde_json::Map::new(),
            variables: job.payload_variables(),
            steps,
            image: ImageJson {
                name: job.image.clone().unwrap_or_default(),
                alias: String::new(),
                command: None,
                entrypoint: None,
                variables: Vec::new(),
                executor_opts: ExecutorOptsJson::default(),
            },
            services,
            artifacts: Some(&job.artifacts)
                .filter(|a| !a.is_empty())
                .map(Vec::as_slice),
            cache: Some(&job.cache)
                .filter(|c| !c.is_empty())
                .map(Vec::as_slice),
            credentials: None,
            dependencies: None,
            features: FeaturesJson {
                trace_sections: true,
                token_mask_prefixes: None,
                failure_reasons: vec!["script_failure", "runner_system_failure"],
                tracing: None,
            },
            policy_options: PolicyOptionsJson {
                execution_policy_job: false,
                policy_name: String::new(),
            },
            suspend_options: serde_json::Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_job() -> Job {
        Job::new(
            4242,
            "mygroup/myproject",
            "https://gitlab-ci-token:tok@gitlab.example.com/mygroup/myproject.git",
            "0123456789abcdef0123456789abcdef01234567",
            &["make test"],
        )
    }

    #[test]
    fn response_file_lists_top_level_keys_in_runner_order() {
        let job = sample_job();

        let bytes = job.response_file_bytes().expect("serialisable");
        let text = String::from_utf8(bytes).expect("utf-8");

        let keys = [
            "\"id\":",
            "\"token\":",
            "\"allow_git_fetch\":",
            "\"job_info\":",
            "\"git_info\":",
            "\"runner_info\":",
            "\"inputs\":",
            "\"variables\":",
            "\"steps\":",
            "\"image\":",
            "\"services\":",
            "\"artifacts\":",
            "\"cache\":",
            "\"credentials\":",
            "\"dependencies\":",
            "\"features\":",
            "\"policy_options\":",
            "\"suspend_options\":",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|key| text.find(key).unwrap_or(usize::MAX))
            .collect();
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        assert!(!positions.contains(&usize::MAX), "{text}");
        assert_eq!(positions, sorted);
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn response_json_carries_trusted_identifiers() {
        let job = sample_job();

        let json = job.response_json();

        assert_eq!(json["id"], 4242);
        assert_eq!(json["job_info"]["project_id"], 12);
        assert_eq!(json["job_info"]["project_full_path"], "mygroup/myproject");
        assert_eq!(json["git_info"]["sha"], job.sha.as_str());
        assert_eq!(json["git_info"]["ref"], "main");
        assert_eq!(json["git_info"]["depth"], 20);
        assert_eq!(json["steps"][0]["name"], "script");
    }

    #[test]
    fn payload_variables_mark_job_token_masked() {
        let job = sample_job();

        let variables = job.payload_variables();

        let token = variables
            .iter()
            .find(|variable| variable.key == "CI_JOB_TOKEN")
            .expect("CI_JOB_TOKEN is predefined");
        assert!(token.masked);
        assert_eq!(token.value, job.token);
    }

    #[test]
    fn gitlab_repo_url_embeds_the_job_token() {
        assert_eq!(
            Job::gitlab_repo_url("https://gitlab.example.com/", "g/p", "T"),
            "https://gitlab-ci-token:T@gitlab.example.com/g/p.git"
        );
    }
}
