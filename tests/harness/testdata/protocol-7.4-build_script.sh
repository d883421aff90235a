#!/usr/bin/env bash

trap 'exit 1' TERM

case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit
set +o noclobber
(trap 'exit 1' TERM; eval $'export FF_NETWORK_PER_BUILD=false\nexport CI_RUNNER_SHORT_TOKEN=abc123def\nexport CI_BUILDS_DIR=/builds\nexport CI_PROJECT_DIR=/builds/mygroup/myproject\nexport CI_CONCURRENT_ID=0\nexport CI_CONCURRENT_PROJECT_ID=0\nexport CI_SERVER=yes\nexport CI_JOB_STATUS=running\nexport CI_JOB_TIMEOUT=3600\nexport CI_JOB_ID=4242\nexport CI_SERVER_URL=$\'https://gitlab.example.com\'\nexport GREETING=$\'it\\\'s me\'\nexport CI_SHARED_ENVIRONMENT=true\nexport RUNNER_TEMP_PROJECT_DIR=/builds/mygroup/myproject.tmp\nmkdir -p "/builds/mygroup/myproject.tmp"\nprintf \'%s\' $\'line1\\nline2\' > "/builds/mygroup/myproject.tmp/MY_FILE_VAR"\nexport MY_FILE_VAR="/builds/mygroup/myproject.tmp/MY_FILE_VAR"\nexport GITLAB_ENV=/builds/mygroup/myproject.tmp/gitlab_runner_env\nmkdir -p "/builds/mygroup/myproject.tmp"\ntouch "/builds/mygroup/myproject.tmp/gitlab_runner_env"\nwhile read -r line; do export "$line"; done < "/builds/mygroup/myproject.tmp/gitlab_runner_env"\ncd /builds/mygroup/myproject\necho $\'\\x1b[32;1m$ echo "hello $GREETING"\\x1b[0;m\'\necho "hello $GREETING"\necho $\'\\x1b[32;1m$ make test\\x1b[0;m\'\nmake test\n') < /dev/null
exit 0
