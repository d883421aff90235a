export CI_JOB_ID=4242
export GITLAB_ENV=/builds/mygroup/myproject.tmp/gitlab_runner_env
mkdir -p "/builds/mygroup/myproject.tmp"
touch "/builds/mygroup/myproject.tmp/gitlab_runner_env"
while read -r line; do export "$line"; done < "/builds/mygroup/myproject.tmp/gitlab_runner_env"
export GIT_TERMINAL_PROMPT=0
export GCM_INTERACTIVE=Never
export GIT_LFS_SKIP_SMUDGE=1
rm "-f" "/builds/mygroup/myproject/.git/index.lock"
rm "-f" "/builds/mygroup/myproject/.git/shallow.lock"
rm "-f" "/builds/mygroup/myproject/.git/HEAD.lock"
rm "-f" "/builds/mygroup/myproject/.git/hooks/post-checkout"
rm "-f" "/builds/mygroup/myproject/.git/config.lock"
if [ -d "/builds/mygroup/myproject/.git/refs" ]; then
  et='+' ; find /dev/null -exec true {} + 2>/dev/null || et=';' ; find "/builds/mygroup/myproject/.git/refs" -name "*.lock" -type f -exec rm -f {} "${et}"
fi
rm "-f" "/builds/mygroup/myproject.tmp/git-template/config"
if [ -d "/builds/mygroup/myproject.tmp/git-template/hooks" ]; then
  chmod "-R" "u+rwX" "/builds/mygroup/myproject.tmp/git-template/hooks"
fi
rm "-r" "-f" "/builds/mygroup/myproject.tmp/git-template/hooks"
rm "-f" "/builds/mygroup/myproject/.git/config"
if [ -d "/builds/mygroup/myproject/.git/hooks" ]; then
  chmod "-R" "u+rwX" "/builds/mygroup/myproject/.git/hooks"
fi
rm "-r" "-f" "/builds/mygroup/myproject/.git/hooks"
mkdir -p /builds/mygroup/myproject.tmp/git-template
git config -f /builds/mygroup/myproject.tmp/git-template/config init.defaultBranch none
git config -f /builds/mygroup/myproject.tmp/git-template/config fetch.recurseSubmodules false
git config -f /builds/mygroup/myproject.tmp/git-template/config credential.interactive never
git config -f /builds/mygroup/myproject.tmp/git-template/config gc.autoDetach false
rm "-f" "/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf"
git "config" "-f" "/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf" "http.extraHeader" "X-Gitaly-Correlation-ID: 01JEXAMPLECORRELATION"
echo $'\x1b[32;1mGitaly correlation ID: 01JEXAMPLECORRELATION\x1b[0;m'
git "config" "-f" "/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf" "transfer.bundleURI" "true"
git "config" "--file" "/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf" "--replace-all" "url.https://gitlab-ci-token:glcbt-64_EXAMPLETOKEN@gitlab.example.com/mygroup/myproject.git.insteadOf" "https://gitlab.example.com/mygroup/myproject.git" "^https://gitlab\.example\.com/mygroup/myproject\.git$"
git "config" "--file" "/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf" "--replace-all" "url.https://gitlab-ci-token:glcbt-64_EXAMPLETOKEN@gitlab.example.com.insteadOf" "https://gitlab.example.com" "^https://gitlab\.example\.com$"
git "config" "--file" "/builds/mygroup/myproject.tmp/git-template/config" "--replace-all" "include.path" "/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf" "\.gitlab-runner\.ext\.conf$"
export GLR_EXT_GIT_CONFIG_PATH="/builds/mygroup/myproject.tmp/.gitlab-runner.ext.conf"
echo $'\x1b[32;1mFetching changes with git depth set to 20...\x1b[0;m'
git init /builds/mygroup/myproject --template /builds/mygroup/myproject.tmp/git-template
cd /builds/mygroup/myproject
if git remote add origin $'https://gitlab.example.com/mygroup/myproject.git' >/dev/null 2>&1 ; then
  echo $'\x1b[32;1mCreated fresh repository.\x1b[0;m'
else
  git remote set-url origin $'https://gitlab.example.com/mygroup/myproject.git'
  git "config" "--file" ".git/config" "--replace-all" "include.path" "$GLR_EXT_GIT_CONFIG_PATH" "\.gitlab-runner\.ext\.conf$"
fi
git -c $'http.userAgent=gitlab-runner 19.4.0 linux/amd64' fetch origin --no-recurse-submodules $'+refs/pipelines/777:refs/pipelines/777' $'+refs/heads/main:refs/remotes/origin/main' --depth 20 --prune --quiet
echo $'\x1b[32;1mChecking out 01234567 as detached HEAD (ref is main)...\x1b[0;m'
git -c $'submodule.recurse=false' checkout -f -q 0123456789abcdef0123456789abcdef01234567
git clean -ffdx
if git lfs version >/dev/null 2>&1 ; then
  git lfs pull
  echo
fi
echo $'\x1b[32;1mSkipping Git submodules setup\x1b[0;m'
if [ -e "/builds/.gitlab-build-uid-gid" ]; then
  if [ -d "/builds" ]; then
    chown -R "$(stat -c '%u:%g' '/builds/.gitlab-build-uid-gid')" '/builds'
  fi
fi
echo $'url=https://gitlab.example.com\nusername=gitlab-ci-token' | git credential reject || true
