#!/usr/bin/env bash
# Isolated environment for hyperjob's VM tests: a network namespace with its own virtlogd +
# libvirtd, whose "default" NAT network (bridge, dnsmasq, guests) exists only inside it.
#
#   scripts/testenv.sh up | down | status | exec CMD [ARG...]
#
# Environment (all optional):
#   HYPERJOB_NETNS             namespace name               (default hyperjob-test)
#   HYPERJOB_TESTENV_STATE     state directory              (default /run/hyperjob-testenv)
#   HYPERJOB_TESTENV_NETWORK   libvirt network to activate  (default default)
#   HYPERJOB_TESTENV_TIMEOUT   seconds to wait for libvirtd (default 30)
#
# After `up`, $STATE_DIR/env is shell-sourceable: NETNS, LIBVIRT_URI, NETWORK, BRIDGE,
# BRIDGE_IP, BRIDGE_PREFIX, STATE_DIR. Run everything that talks to a guest inside the
# namespace: `scripts/testenv.sh exec cargo test ...` (or `ip netns exec "$NETNS" ...`).
set -euo pipefail

PROG=$(basename -- "$0")
readonly PROG
readonly NETNS=${HYPERJOB_NETNS:-hyperjob-test}
readonly STATE_DIR=${HYPERJOB_TESTENV_STATE:-/run/hyperjob-testenv}
readonly NETWORK=${HYPERJOB_TESTENV_NETWORK:-default}
readonly TIMEOUT=${HYPERJOB_TESTENV_TIMEOUT:-30}
readonly URI=qemu:///system
# Daemons that would own (or be reached through) the qemu:///system sockets.
readonly LIBVIRT_DAEMONS="libvirtd virtlogd virtqemud virtnetworkd virtproxyd"

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
virsh_() { virsh -q -c "$URI" "$@"; }

# --- processes, identified by pid + start time (so a recycled pid is never mistaken) ---------

proc_starttime() { # PID -> start time in clock ticks since boot; fails if gone or a zombie
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086  # split the fields on purpose
    set -- $stat
    [ "$1" != Z ] || return 1
    echo "${20}"
}

record_pid() { # NAME PID
    echo "$2 $(proc_starttime "$2")" >"$STATE_DIR/$1.pid"
}

recorded_pid() { # NAME -> pid, if that process is alive and is the one we recorded
    local pid start
    [ -s "$STATE_DIR/$1.pid" ] || return 1
    read -r pid start <"$STATE_DIR/$1.pid" || return 1
    [ -n "$pid" ] && [ "$(proc_starttime "$pid")" = "$start" ] || return 1
    echo "$pid"
}

stop_pid() { # LABEL PID GRACE_SECONDS: SIGTERM, bounded wait, SIGKILL, bounded wait
    local label=$1 pid=$2 grace=$3 start i
    start=$(proc_starttime "$pid") || return 0
    alive() { [ "$(proc_starttime "$pid")" = "$start" ]; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive || return 0
        sleep 0.1
    done
    log "$label (pid $pid) ignored SIGTERM for ${grace} s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive || return 0
        sleep 0.1
    done
    log "warning: $label (pid $pid) still exists after SIGKILL"
}

foreign_daemons() { # prints "name pid" for libvirt daemons that we did not start
    local ours="" d pid comm
    for d in libvirtd virtlogd; do
        pid=$(recorded_pid "$d") && ours+=" $pid "
    done
    for d in /proc/[0-9]*; do
        comm=$(cat "$d/comm" 2>/dev/null) || continue
        case " $LIBVIRT_DAEMONS " in *" $comm "*) ;; *) continue ;; esac
        pid=${d#/proc/}
        case "$ours" in *" $pid "*) continue ;; esac
        # A zombie (e.g. our own daemon, killed, not yet reaped by PID 1) runs nothing.
        proc_starttime "$pid" >/dev/null || continue
        echo "$comm $pid"
    done
}

netns_exists() { [ -e "/run/netns/$NETNS" ]; }

wait_for_file() { # FILE SECONDS
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -s "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

# --- up ---------------------------------------------------------------------------------------

start_daemon() { # NAME: start NAME -d inside the namespace, record its pid
    local name=$1 pidfile=$STATE_DIR/$1.daemon.pid pid
    rm -f "$pidfile"
    # fd 8 (our lock) must not leak into the daemon, or it would hold the lock forever.
    ip netns exec "$NETNS" env LIBVIRT_LOG_OUTPUTS="3:file:$STATE_DIR/$name.log" \
        "$name" -d -p "$pidfile" 8<&- </dev/null >>"$STATE_DIR/$name.log" 2>&1 ||
        die "$name -d failed inside netns $NETNS (see $STATE_DIR/$name.log)"
    wait_for_file "$pidfile" 10 || die "$name wrote no pid file $pidfile within 10 s"
    pid=$(cat "$pidfile")
    proc_starttime "$pid" >/dev/null || die "$name (pid $pid) exited right after starting (see $STATE_DIR/$name.log)"
    record_pid "$name" "$pid"
}

wait_for_libvirt() {
    local delay=0.1 waited=0
    until virsh_ version >/dev/null 2>&1; do
        recorded_pid libvirtd >/dev/null ||
            die "libvirtd exited during start-up; last log lines: $(tail -n 3 "$STATE_DIR/libvirtd.log" 2>/dev/null | tr '\n' ' ')"
        if awk -v w="$waited" -v t="$TIMEOUT" 'BEGIN { exit !(w >= t) }'; then
            die "libvirtd did not answer on $URI within ${TIMEOUT} s (see $STATE_DIR/libvirtd.log)"
        fi
        sleep "$delay"
        waited=$(awk -v w="$waited" -v d="$delay" 'BEGIN { print w + d }')
        delay=$(awk -v d="$delay" 'BEGIN { d *= 2; if (d > 2) d = 2; print d }')
    done
}

network_active() { # (no `virsh | grep -q`: with pipefail, grep's early exit can fail the pipe)
    local info
    info=$(virsh_ net-info "$NETWORK" 2>/dev/null) || return 1
    grep -Eq '^Active:[[:space:]]+yes' <<<"$info"
}

ensure_network() {
    local i xml bridge addr prefix netmask
    if ! network_active; then
        # Fails with "network is already active" if libvirtd's own autostart got there first.
        if ! virsh_ net-start "$NETWORK" >/dev/null 2>"$STATE_DIR/net-start.err"; then
            for ((i = 0; i < 50; i++)); do
                network_active && break
                sleep 0.1
            done
            network_active ||
                die "virsh net-start $NETWORK failed: $(tr '\n' ' ' <"$STATE_DIR/net-start.err")"
        fi
    fi
    rm -f "$STATE_DIR/net-start.err"
    xml=$(virsh_ net-dumpxml "$NETWORK") || die "virsh net-dumpxml $NETWORK failed"
    bridge=$(sed -n "s/.*<bridge [^>]*name=['\"]\([^'\"]*\)['\"].*/\1/p" <<<"$xml")
    addr=$(sed -n "s/.*<ip [^>]*address=['\"]\([0-9.]*\)['\"].*/\1/p" <<<"$xml")
    prefix=$(sed -n "s/.*<ip [^>]*prefix=['\"]\([0-9]*\)['\"].*/\1/p" <<<"$xml")
    netmask=$(sed -n "s/.*<ip [^>]*netmask=['\"]\([0-9.]*\)['\"].*/\1/p" <<<"$xml")
    bridge=${bridge%%$'\n'*} addr=${addr%%$'\n'*} prefix=${prefix%%$'\n'*} netmask=${netmask%%$'\n'*}
    [ -n "$bridge" ] || die "network $NETWORK has no bridge name in its XML"
    [ -n "$addr" ] || die "network $NETWORK has no IPv4 <ip address=...> in its XML"
    if [ -z "$prefix" ] && [ -n "$netmask" ]; then
        prefix=$(awk -F. '{ n = 0; for (i = 1; i <= 4; i++) { v = $i; while (v) { n += v % 2; v = int(v / 2) } } print n }' <<<"$netmask")
    fi
    ip -n "$NETNS" link show "$bridge" >/dev/null 2>&1 ||
        die "bridge $bridge of network $NETWORK is not in netns $NETNS"
    if ip link show "$bridge" >/dev/null 2>&1; then
        die "a bridge $bridge exists in the root namespace: refusing (guest traffic must stay inside netns $NETNS)"
    fi
    {
        echo "# written by scripts/testenv.sh up; source it"
        echo "NETNS=$NETNS"
        echo "LIBVIRT_URI=$URI"
        echo "NETWORK=$NETWORK"
        echo "BRIDGE=$bridge"
        echo "BRIDGE_IP=$addr"
        echo "BRIDGE_PREFIX=${prefix:-24}"
        echo "STATE_DIR=$STATE_DIR"
    } >"$STATE_DIR/env.tmp"
    mv -f "$STATE_DIR/env.tmp" "$STATE_DIR/env"
}

is_up() {
    netns_exists && recorded_pid libvirtd >/dev/null && recorded_pid virtlogd >/dev/null
}

cmd_up() {
    local foreign
    if is_up; then
        ensure_network
        log "already up (netns $NETNS, libvirtd pid $(recorded_pid libvirtd)); facts in $STATE_DIR/env"
        return 0
    fi
    if [ -d "$STATE_DIR" ]; then
        log "found a partial test environment in $STATE_DIR; tearing it down first"
        do_down
    fi

    foreign=$(foreign_daemons)
    foreign=${foreign%%$'\n'*}
    if [ -n "$foreign" ]; then
        die "a ${foreign% *} (pid ${foreign#* }) is already running that $PROG did not start; refusing to touch it (stop it, then retry)"
    fi
    local f
    for f in /run/libvirtd.pid /run/virtlogd.pid /run/libvirt/virtqemud.pid; do
        if [ -s "$f" ] && proc_starttime "$(cat "$f")" >/dev/null; then
            die "$f names a live process (pid $(cat "$f")) that $PROG did not start; refusing"
        fi
    done
    for cmd in ip virsh libvirtd virtlogd; do
        command -v "$cmd" >/dev/null || die "$cmd not found (run scripts/install-deps.sh)"
    done

    if netns_exists; then
        [ -z "$(ip netns pids "$NETNS" 2>/dev/null)" ] ||
            die "netns $NETNS already exists and has processes in it; refusing (pick another HYPERJOB_NETNS)"
        log "reusing the empty leftover netns $NETNS"
    else
        ip netns add "$NETNS" || die "ip netns add $NETNS failed"
    fi
    (umask 022 && mkdir -p "$STATE_DIR")
    echo "$NETNS" >"$STATE_DIR/netns"
    ip -n "$NETNS" link set lo up

    start_daemon virtlogd
    start_daemon libvirtd
    wait_for_libvirt
    # Persistent domains that existed before we came up are not ours to undefine on `down`.
    virsh_ list --all --persistent --name 2>/dev/null | sed '/^$/d' >"$STATE_DIR/preexisting-domains" || true
    ensure_network

    log "up: netns $NETNS, libvirtd pid $(recorded_pid libvirtd), virtlogd pid $(recorded_pid virtlogd), $(grep -E '^(BRIDGE|BRIDGE_IP)=' "$STATE_DIR/env" | tr '\n' ' ')"
    log "facts in $STATE_DIR/env"
}

# --- down -------------------------------------------------------------------------------------

do_down() {
    local pid name dom pids i

    if pid=$(recorded_pid libvirtd); then
        if virsh_ version >/dev/null 2>&1; then
            for dom in $(virsh_ list --name 2>/dev/null); do
                virsh_ destroy "$dom" >/dev/null 2>&1 || log "warning: virsh destroy $dom failed"
            done
            for dom in $(virsh_ list --all --persistent --name 2>/dev/null); do
                grep -qxF -- "$dom" "$STATE_DIR/preexisting-domains" 2>/dev/null && continue
                virsh_ undefine "$dom" >/dev/null 2>&1 || log "warning: virsh undefine $dom failed"
            done
            if network_active; then
                virsh_ net-destroy "$NETWORK" >/dev/null 2>&1 || log "warning: virsh net-destroy $NETWORK failed"
            fi
        fi
        stop_pid libvirtd "$pid" 5
    fi
    if pid=$(recorded_pid virtlogd); then
        stop_pid virtlogd "$pid" 5
    fi

    # Whatever is still inside our namespace was started by our daemons (dnsmasq, qemu).
    if netns_exists; then
        pids=$(ip netns pids "$NETNS" 2>/dev/null || true)
        for pid in $pids; do
            name=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
            log "stopping leftover $name (pid $pid) in netns $NETNS"
            stop_pid "$name" "$pid" 3
        done
    fi

    # A SIGKILLed daemon leaves its sockets behind; no daemon of ours runs any more, and up
    # refuses to start next to a foreign one, so these are ours.
    if [ -z "$(foreign_daemons)" ]; then
        for name in libvirt-sock libvirt-sock-ro libvirt-admin-sock virtlogd-sock virtlogd-admin-sock; do
            [ -S "/run/libvirt/$name" ] && rm -f "/run/libvirt/$name"
        done
    fi

    if netns_exists; then
        for ((i = 0; i < 20; i++)); do
            ip netns delete "$NETNS" 2>/dev/null && break
            sleep 0.1
        done
        netns_exists && die "could not delete netns $NETNS"
    fi
    rm -rf -- "$STATE_DIR"
}

cmd_down() {
    if [ ! -d "$STATE_DIR" ] && ! netns_exists; then
        log "nothing is up"
        return 0
    fi
    if [ ! -d "$STATE_DIR" ] && [ -n "$(ip netns pids "$NETNS" 2>/dev/null)" ]; then
        die "netns $NETNS has processes but no state in $STATE_DIR: not ours, refusing to touch it"
    fi
    do_down
    log "down"
}

# --- status / exec ----------------------------------------------------------------------------

cmd_status() {
    local pid d
    if netns_exists; then echo "netns:     $NETNS"; else echo "netns:     $NETNS (absent)"; fi
    for d in virtlogd libvirtd; do
        if pid=$(recorded_pid "$d"); then
            printf '%-10s pid %s\n' "$d:" "$pid"
        else
            printf '%-10s not running (ours)\n' "$d:"
        fi
    done
    if recorded_pid libvirtd >/dev/null && virsh_ version >/dev/null 2>&1; then
        if network_active; then echo "network:   $NETWORK active"; else echo "network:   $NETWORK inactive"; fi
        echo "domains:   $(virsh_ list --all --name | sed '/^$/d' | tr '\n' ' ')"
    fi
    if [ -s "$STATE_DIR/env" ]; then
        echo "env:       $STATE_DIR/env"
        sed -e '/^#/d' -e 's/^/  /' "$STATE_DIR/env"
    fi
    d=$(foreign_daemons | tr '\n' ' ')
    [ -z "$d" ] || echo "foreign:   $d(not started by $PROG)"
    is_up
}

main() {
    [ $# -ge 1 ] || die "usage: $PROG up|down|status|exec CMD [ARG...]"
    local cmd=$1
    shift
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, libvirtd)"
    case "$cmd" in
    exec)
        [ $# -ge 1 ] || die "usage: $PROG exec CMD [ARG...]"
        netns_exists || die "netns $NETNS does not exist (run: $PROG up)"
        exec ip netns exec "$NETNS" "$@"
        ;;
    status) cmd_status; return ;;
    up|down) ;;
    *) die "unknown command '$cmd' (usage: $PROG up|down|status|exec CMD [ARG...])" ;;
    esac
    [[ $TIMEOUT =~ ^[0-9]+$ ]] || die "HYPERJOB_TESTENV_TIMEOUT must be whole seconds"
    # Serialise up/down (the lock is on the state directory's parent, which always exists).
    local parent
    parent=$(dirname -- "$STATE_DIR")
    mkdir -p "$parent"
    exec 8<"$parent"
    flock 8
    "cmd_$cmd"
}

main "$@"
