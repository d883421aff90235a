#!/usr/bin/env bash
# Fuzzes hyperjob's input parsers (fuzz/, cargo-fuzz + libFuzzer + AddressSanitizer): builds
# every target, runs each for SECONDS_PER_TARGET (default 20) and fails if any of them finds a
# crash, leaving the crashing input under fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Works on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the unstable
# flags cargo-fuzz passes (-Zsanitizer=address and friends). Installs cargo-fuzz if missing.
# Environment:
#   FUZZ_TARGETS="config pid_capture"  run only these targets (default: all)
#   FUZZ_SANITIZER=none                build without AddressSanitizer (faster; default address)
# Inputs the fuzzer finds worth keeping go to fuzz/target/corpus/<target>/ (not in git) and
# are reused by the next run; the committed seeds in fuzz/corpus/<target>/ are only read.
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)

seconds=${1:-20}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (a positive number of seconds)" >&2
    exit 2
fi
sanitizer=${FUZZ_SANITIZER:-address}
cargo_fuzz_version=0.13.2

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi

# The product crates link libvirt and libssh2.
if ! pkg-config --exists libvirt libssh2 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
        scripts/install-deps.sh
    else
        echo "fuzz.sh: libvirt and libssh2 development files are missing: run scripts/install-deps.sh as root" >&2
        exit 1
    fi
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz.sh: no fuzz targets found" >&2
    exit 1
fi

echo "fuzz.sh: building ${targets[*]} (sanitizer: $sanitizer)"
cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer"

logs=fuzz/target/logs
mkdir -p "$logs"
failed=()
summary=()
for target in "${targets[@]}"; do
    seeds=fuzz/corpus/$target
    work=fuzz/target/corpus/$target
    mkdir -p "$work" "fuzz/artifacts/$target"
    args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    if [ -f "fuzz/dict/$target.dict" ]; then
        args+=(-dict="fuzz/dict/$target.dict")
    fi
    corpora=("$work")
    if [ -d "$seeds" ]; then
        corpora+=("$seeds")
    fi
    log=$logs/$target.log
    echo "fuzz.sh: running $target for $seconds s"
    status=0
    cargo fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" "${corpora[@]}" \
        -- "${args[@]}" >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    if [ "$status" -eq 0 ]; then
        result=ok
    else
        # The failure report: the assertion or sanitizer message, the input, how to reproduce.
        {
            echo "fuzz.sh: $target failed:"
            awk '/panicked at/ { p = 1 } p && /^(stack backtrace:|==[0-9]+==)/ { exit } p' "$log" | head -n 20
            grep -E '^(==[0-9]+==ERROR|SUMMARY:|ERROR: libFuzzer)' "$log" | head -n 5
            awk '/^Failing input:/ { p = 1 } /^Error: / { p = 0 } p' "$log"
        } >&2 || true
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        case $artifact in
            "" | /*) ;;
            *) artifact=$root/$artifact ;;
        esac
        result="FAILED (exit $status)${artifact:+: $artifact}; log: $root/$log"
        failed+=("$target")
    fi
    summary+=("$(printf '%-16s %12s execs %8s exec/s  %s' "$target" "${execs:-?}" "${rate:-?}" "$result")")
done

echo
echo "fuzz.sh: $seconds s per target"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashes found in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: no crashes"
