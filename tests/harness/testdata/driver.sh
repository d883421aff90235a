#!/usr/bin/env bash
# A tiny Custom executor driver for the harness's own tests: it runs every
# stage script locally with `bash "$script"`. Environment knobs (all optional)
# make it fail on purpose:
#   HJT_CALLS              file to append one line per call ("run build_script")
#   HJT_STATE_DIR          dir for markers (HJT_FAIL_ONCE_STAGE)
#   HJT_CONFIG_JSON        config stdout verbatim (default: driver name/version)
#   HJT_CONFIG_STDERR      line config writes to stderr
#   HJT_CONFIG_EXIT        config exit status
#   HJT_PREPARE_EXIT       prepare exit status
#   HJT_PREPARE_CODE_FILE  text prepare writes to BUILD_EXIT_CODE_FILE
#   HJT_PREPARE_SLEEP      seconds prepare sleeps before finishing
#   HJT_FAIL_STAGE         run stage that exits HJT_FAIL_EXIT (default 2)
#   HJT_FAIL_ONCE_STAGE    run stage whose first call exits 1
#   HJT_IGNORE_TERM_STAGE  run stage that ignores SIGTERM and never ends
#   HJT_NO_CODE_FILE=1     do not write BUILD_EXIT_CODE_FILE on script failure

record() {
  if [ -n "${HJT_CALLS:-}" ]; then
    printf '%s\n' "$*" >> "$HJT_CALLS"
  fi
}

command_name="$1"
shift

case "$command_name" in
  config)
    record config
    if [ -n "${HJT_CONFIG_STDERR:-}" ]; then
      printf '%s\n' "$HJT_CONFIG_STDERR" >&2
    fi
    if [ -n "${HJT_CONFIG_JSON+set}" ]; then
      printf '%s' "$HJT_CONFIG_JSON"
    else
      printf '%s' '{"driver":{"name":"harness-test-driver","version":"1.0"}}'
    fi
    exit "${HJT_CONFIG_EXIT:-0}"
    ;;
  prepare)
    record prepare
    read -r _ _ _ _ pgid _ < "/proc/$$/stat"
    echo "prepare: job=${CUSTOM_ENV_CI_JOB_ID:-} vm=${VM_NAME:-}"
    echo "prepare: cwd=$PWD"
    echo "prepare: tmpdir=${TMPDIR:-}"
    echo "prepare: stdin=$(readlink "/proc/$$/fd/0")"
    echo "prepare: pid=$$ pgid=$pgid"
    echo "prepare: response_mode=$(stat -c %a "$JOB_RESPONSE_FILE")"
    if [ -n "${HJT_PREPARE_CODE_FILE+set}" ]; then
      printf '%s' "$HJT_PREPARE_CODE_FILE" > "$BUILD_EXIT_CODE_FILE"
    fi
    if [ -n "${HJT_PREPARE_SLEEP:-}" ]; then
      sleep "$HJT_PREPARE_SLEEP"
    fi
    exit "${HJT_PREPARE_EXIT:-0}"
    ;;
  run)
    script="$1"
    stage="$2"
    record "run $stage"
    if [ "$stage" = "${HJT_FAIL_STAGE:-}" ]; then
      echo "failing $stage on purpose" >&2
      exit "${HJT_FAIL_EXIT:-2}"
    fi
    if [ "$stage" = "${HJT_FAIL_ONCE_STAGE:-}" ] && [ ! -e "$HJT_STATE_DIR/failed-$stage" ]; then
      touch "$HJT_STATE_DIR/failed-$stage"
      echo "failing the first $stage on purpose" >&2
      exit "$BUILD_FAILURE_EXIT_CODE"
    fi
    if [ "$stage" = "${HJT_IGNORE_TERM_STAGE:-}" ]; then
      trap '' TERM
      echo "ignoring SIGTERM in $stage"
      while :; do sleep 0.05; done
    fi
    bash "$script"
    status=$?
    if [ "$status" -ne 0 ]; then
      if [ "${HJT_NO_CODE_FILE:-}" != 1 ]; then
        printf '%s\n' "$status" > "$BUILD_EXIT_CODE_FILE"
      fi
      exit "$BUILD_FAILURE_EXIT_CODE"
    fi
    exit 0
    ;;
  cleanup)
    record cleanup
    echo "cleanup-stdout job=${CUSTOM_ENV_CI_JOB_ID:-} vm=${VM_NAME:-}"
    echo "cleanup-stderr" >&2
    exit 0
    ;;
  *)
    echo "unknown command $command_name" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
    ;;
esac
