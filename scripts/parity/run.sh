#!/usr/bin/env bash
# `make parity`: stage-by-stage parity of our pipeline against LatentSync's own code
# (scripts/parity/parity.py; docs/fidelity.md, "Stage-by-stage parity harness").
#
#   LATENTSYNC_SRC=~/src/LatentSync bash scripts/parity/run.sh [parity.py options]
#
# Environment:
#   LATENTSYNC_SRC  a LatentSync checkout at commit a229c39 (default .local/LatentSync, the
#                   one `make models` / `make models-check` clone); another commit is refused
#   PARITY_MODELS   the fp32 random-weight export (default .local/models-check/latentsync-1.5-fp32;
#                   made here by `make models-check` when missing)
#
# Needs what `make setup` installs (Rust toolchain, ONNX Runtime, ffmpeg) and the exporter
# venv .venv-export (torch; created by models/make_models.sh), plus the reference's image
# packages pinned below, installed into that venv when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
say() { printf 'parity: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

COMMIT=a229c3948406bc2cf6eaf4873e662e70c6a04746
SRC="${LATENTSYNC_SRC:-$ROOT/.local/LatentSync}"
MODELS="${PARITY_MODELS:-$ROOT/.local/models-check/latentsync-1.5-fp32}"
VENV="$ROOT/.venv-export"
# The reference's own pins (its requirements.txt) for torchvision and kornia. OpenCV: the
# reference pins opencv-python 4.9.0.80, which is built against numpy 1 and does not load
# next to the exporter's numpy 2; 4.10.0.84 is the first build for numpy 2 (the resize and
# erode calls the reference makes are unchanged between the two).
PARITY_PKGS=(torchvision==0.20.1 kornia==0.8.0 opencv-python-headless==4.10.0.84)

[[ -d "$SRC/.git" || -f "$SRC/.git" ]] || die "LATENTSYNC_SRC=$SRC is not a git checkout of LatentSync (git clone https://github.com/bytedance/LatentSync; git checkout ${COMMIT:0:7})"
head="$(git -C "$SRC" rev-parse HEAD)"
[[ "$head" == "$COMMIT" ]] || die "LATENTSYNC_SRC=$SRC is at commit ${head:0:7}, the harness is pinned to ${COMMIT:0:7} (git -C $SRC checkout ${COMMIT:0:7})"

if [[ ! -f "$MODELS/manifest.lock.toml" ]]; then
    [[ -z "${PARITY_MODELS:-}" ]] || die "PARITY_MODELS=$MODELS has no manifest.lock.toml"
    say "no random-weight export yet: running make models-check (several minutes)"
    LATENTSYNC_SRC="$SRC" bash models/make_models.sh --random-weights --precision fp32
fi
[[ -x "$VENV/bin/python" ]] || die "$VENV missing (make models-check creates it)"
if [[ ! -f "$MODELS/ddim_step.onnx" ]]; then
    # an export from before the DDIM step graph: add it (no weights, no torch)
    say "adding ddim_step.onnx to $MODELS"
    "$VENV/bin/python" -W ignore models/export/export.py --profile latentsync-1.5 --precision fp32 \
        --latentsync-src "$SRC" --out "$MODELS" --random-weights --only ddim_step \
        --seed "$(sed -n 's/^seed = //p' "$MODELS/manifest.lock.toml")"
fi
if ! "$VENV/bin/python" -c 'import torch, diffusers, torchvision, kornia, cv2' 2>/dev/null; then
    say "installing ${PARITY_PKGS[*]} into $VENV"
    "$VENV/bin/pip" install -q "${PARITY_PKGS[@]}"
fi

. ./.local/env.sh
say "building the parity binary (tests/src/bin/parity.rs)"
cargo build -q -p lipsync-tests --bin parity
exec nice "$VENV/bin/python" -W ignore scripts/parity/parity.py --latentsync-src "$SRC" \
    --models "$MODELS" --bin "$ROOT/target/debug/parity" "$@"
