#!/usr/bin/env bash
# deploy/local/run.sh: run the whole service on this machine (`make up`).
#
# - Sources .local/env.sh (runs scripts/setup.sh first if it is missing).
# - Unless LIPSYNC_NATS__URL is set, starts nats-server with JetStream from
#   deploy/local/nats.conf (127.0.0.1:4222, monitoring 127.0.0.1:8222, data in
#   .local/nats-data) and waits until it reports healthy.
# - Starts every process in deploy/local/Procfile whose binary exists in
#   target/release (or $CARGO_TARGET_DIR/release), with LIPSYNC_NATS__URL and
#   LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=true (local demo: the gateway then listens on
#   127.0.0.1:8000 only, and a non-loopback LIPSYNC_GATEWAY__LISTEN is refused) and LIPSYNC_MUX__LOCAL_DIR=outputs
#   (results also land in outputs/{task_id}/ as the seed guide says) exported, each output
#   line prefixed with the process name. Missing binaries are skipped with a note.
# - Ctrl-C / SIGTERM: SIGTERM to every process, up to 30 s grace (then SIGKILL),
#   nats-server last. If any process exits on its own, everything is stopped.
#
# Children run in their own sessions (setsid) so that a terminal Ctrl-C reaches only
# this script, which then stops them in order, each with exactly one SIGTERM.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

if [[ ! -f .local/env.sh ]]; then
    bash scripts/setup.sh
fi
# shellcheck source=/dev/null
. ./.local/env.sh

PROCFILE="deploy/local/Procfile"
NATS_CONF="deploy/local/nats.conf"
NATS_URL_LOCAL="nats://127.0.0.1:4222"
NATS_HEALTH="http://127.0.0.1:8222/healthz?js-enabled-only=true"
NATS_START_TIMEOUT_S=20
STOP_GRACE_S=${RUN_STOP_GRACE_S:-30}
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"

log() { printf '%-8s| %s\n' "run" "$*"; }
die() {
    log "ERROR: $*"
    exit 1
}

names=() # process names, parallel to pids
pids=()
nats_pid=""

# Prefix every line on stdin with NAME. Ignores INT/TERM so that it keeps
# forwarding a process's last lines while that process shuts down.
prefix() {
    trap '' INT TERM
    local p
    printf -v p '%-8s| ' "$1"
    p=${p//\\/\\\\}
    p=${p//&/\\&}
    p=${p//|/\\|}
    exec sed -u "s|^|$p|"
}

# start NAME CMD [ARGS...]: run CMD in the background in its own session.
start() {
    local name="$1"
    shift
    setsid "$@" < /dev/null > >(prefix "$name") 2>&1 &
    names+=("$name")
    pids+=("$!")
}

alive() { # alive PID: running and not a zombie
    local s
    [[ -r "/proc/$1/stat" ]] || return 1
    read -r s < "/proc/$1/stat" 2> /dev/null || return 1
    s=${s##*) }
    [[ "${s%% *}" != Z ]]
}

# stop_pids GRACE PID...: SIGTERM, wait up to GRACE seconds, then SIGKILL.
stop_pids() {
    local grace="$1"
    shift
    local p left deadline=$((SECONDS + grace))
    for p in "$@"; do kill -TERM "$p" 2> /dev/null || true; done
    while :; do
        left=()
        for p in "$@"; do alive "$p" && left+=("$p"); done
        ((${#left[@]})) || break
        if ((SECONDS >= deadline || nsig > 1)); then
            names_of "${left[@]}"
            if ((nsig > 1)); then
                log "second signal: sending SIGKILL to: $NAMES"
            else
                log "still running after ${grace}s, sending SIGKILL to: $NAMES"
            fi
            for p in "${left[@]}"; do kill -KILL "$p" 2> /dev/null || true; done
            break
        fi
        sleep 0.2
    done
    for p in "$@"; do wait "$p" 2> /dev/null || true; done
}

# names_of PID...: sets NAMES to the process names (no subshell: a second Ctrl-C
# would kill a command substitution, whose subshell does not keep our traps).
NAMES=""
names_of() {
    local p i out=()
    for p in "$@"; do
        for i in "${!pids[@]}"; do [[ "${pids[$i]}" == "$p" ]] && out+=("${names[$i]}"); done
    done
    NAMES="${out[*]}"
}

stopping=0
shutdown() {
    ((stopping)) && return 0
    stopping=1
    local p stages=()
    for p in "${pids[@]}"; do [[ "$p" != "$nats_pid" ]] && alive "$p" && stages+=("$p"); done
    if ((${#stages[@]})); then
        names_of "${stages[@]}"
        log "stopping $NAMES (SIGTERM, up to ${STOP_GRACE_S}s; Ctrl-C again to kill at once)"
        stop_pids "$STOP_GRACE_S" "${stages[@]}"
    fi
    if [[ -n "$nats_pid" ]] && alive "$nats_pid"; then
        log "stopping nats-server"
        stop_pids 15 "$nats_pid"
    fi
    sleep 0.2 # let the last prefixed lines through first
    log "all stopped"
}

# Also clean up if this script fails half-way through start-up.
trap 'shutdown' EXIT
nsig=0
signal=""
trap 'signal=INT; nsig=$((nsig + 1))' INT
trap 'signal=TERM; nsig=$((nsig + 1))' TERM

# ---------------------------------------------------------------- nats-server
if [[ -z "${LIPSYNC_NATS__URL:-}" ]]; then
    [[ -x "${LIPSYNC_NATS_SERVER_BIN:-}" ]] || die "nats-server not found (LIPSYNC_NATS_SERVER_BIN); run make setup"
    if (exec 3<> /dev/tcp/127.0.0.1/4222) 2> /dev/null; then
        die "127.0.0.1:4222 is already in use (another nats-server?). Stop it, or set LIPSYNC_NATS__URL to use it."
    fi
    mkdir -p .local/nats-data
    log "starting nats-server ($("$LIPSYNC_NATS_SERVER_BIN" --version 2>&1)) with $NATS_CONF"
    start nats "$LIPSYNC_NATS_SERVER_BIN" -c "$NATS_CONF"
    nats_pid="${pids[-1]}"
    deadline=$((SECONDS + NATS_START_TIMEOUT_S))
    until curl -sf -o /dev/null --max-time 1 "$NATS_HEALTH"; do
        alive "$nats_pid" || die "nats-server exited during start-up (see its lines above)"
        ((SECONDS < deadline)) || die "nats-server not healthy after ${NATS_START_TIMEOUT_S}s ($NATS_HEALTH)"
        [[ -z "$signal" ]] || exit 130
        sleep 0.1
    done
    export LIPSYNC_NATS__URL="$NATS_URL_LOCAL"
    log "nats-server ready at $LIPSYNC_NATS__URL (monitoring http://127.0.0.1:8222)"
else
    export LIPSYNC_NATS__URL
    log "using the NATS server at $LIPSYNC_NATS__URL (not starting one)"
fi
export LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS="${LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS:-true}"
export LIPSYNC_GATEWAY__WEBHOOK_ALLOW_PRIVATE_NETWORKS="${LIPSYNC_GATEWAY__WEBHOOK_ALLOW_PRIVATE_NETWORKS:-$LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS}"
# Downloads from private addresses are a local-demo setting: the API then listens on
# loopback only, and a non-loopback address is refused (set
# LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=false to serve others).
if [[ "$LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS" == true ]]; then
    listen="${LIPSYNC_GATEWAY__LISTEN:-127.0.0.1:8000}"
    case "$listen" in
        127.* | localhost:* | "[::1]:"*) ;;
        *) die "LIPSYNC_GATEWAY__LISTEN=$listen is not a loopback address while downloads from private networks are allowed (LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=true): that would let anyone who reaches this machine make it fetch from your local network. Listen on 127.0.0.1, or set LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=false." ;;
    esac
    export LIPSYNC_GATEWAY__LISTEN="$listen"
fi
export LIPSYNC_MUX__LOCAL_DIR="${LIPSYNC_MUX__LOCAL_DIR:-$ROOT/outputs}"

# outputs/ on local disk follows the artifact store's retention: task folders older than
# artifacts.ttl_s (LIPSYNC_ARTIFACTS__TTL_S, default 7 days) are pruned at start-up and
# then hourly, so the copies the seed guide reads never outlive the stored results.
prune_outputs() {
    local dir="$LIPSYNC_MUX__LOCAL_DIR" ttl_min=$(( (${LIPSYNC_ARTIFACTS__TTL_S:-604800} + 59) / 60 ))
    [[ -d "$dir" ]] || return 0
    find "$dir" -mindepth 1 -maxdepth 1 -type d -mmin "+$ttl_min" -exec rm -rf -- {} + 2>/dev/null || true
}
prune_outputs
# (Not one of the service processes: it ends by itself once this script is gone.)
( parent=$$; while sleep 3600 && kill -0 "$parent" 2>/dev/null; do prune_outputs; done ) &

# ------------------------------------------------------------------ processes
[[ -f "$PROCFILE" ]] || die "$PROCFILE not found"
skipped=()
while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    [[ "$line" =~ ^[[:space:]]*$ ]] && continue
    [[ "$line" =~ ^[[:space:]]*([A-Za-z0-9_.-]+)[[:space:]]*:[[:space:]]*(.+)$ ]] ||
        die "$PROCFILE: cannot parse line: $line"
    name="${BASH_REMATCH[1]}"
    read -r -a argv <<< "${BASH_REMATCH[2]}"
    bin="${argv[0]}"
    if [[ -x "$BIN_DIR/$bin" ]]; then
        log "starting $name: $bin ${argv[*]:1}"
        start "$name" "$BIN_DIR/$bin" "${argv[@]:1}"
    else
        skipped+=("$name ($bin)")
    fi
done < "$PROCFILE"

if ((${#skipped[@]})); then
    log "skipped, not built in $BIN_DIR: ${skipped[*]}"
fi
if ((${#pids[@]} == 0)); then
    log "nothing to run (no binaries built and NATS is external); run make build"
    exit 1
fi
if [[ -x "$BIN_DIR/lipsync-gateway" ]] && grep -qE '^[[:space:]]*[A-Za-z0-9_.-]+[[:space:]]*:[[:space:]]*lipsync-gateway' "$PROCFILE"; then
    log "gateway: http://localhost:8000 (stop with Ctrl-C)"
else
    log "running; stop with Ctrl-C"
fi

# ---------------------------------------------------------------- supervision
rc=0
while [[ -z "$signal" ]]; do
    exited=""
    status=0
    wait -n -p exited "${pids[@]}" || status=$?
    [[ -n "$signal" ]] && break
    if [[ -n "$exited" ]]; then
        names_of "$exited"
        log "$NAMES exited with status $status; stopping everything"
        rc=1
        break
    fi
done
[[ -n "$signal" ]] && log "got SIG$signal"
shutdown
exit "$rc"
