#!/usr/bin/env bash
# Export the real LatentSync models to ONNX (`make models`), or check the exporter on the real
# architectures with random weights (`make models-check`).
#
#   bash models/make_models.sh                    # download checkpoints, export, verify, lock file
#   bash models/make_models.sh --random-weights   # no download: real architectures, seeded weights
#
# Environment:
#   LATENTSYNC_PROFILE  latentsync-1.5 (default, 256 px) | latentsync-1.6 (512 px)
#   PRECISION           auto (default: fp16 where nvidia-smi reports a GPU, the UNet's
#                       speed format there; fp32 elsewhere, the CPU's) | fp32 | fp16
#                       (float32 at the boundary, Casts inside)
#   LATENTSYNC_SRC      an existing LatentSync checkout (default: clone LATENTSYNC_REPO at
#                       LATENTSYNC_COMMIT into .local/LatentSync)
#   OUT                 output folder (default models/generated/<profile>)
#   CKPT_DIR            where checkpoints are downloaded (default .local/checkpoints/<profile>).
#                       Without model-hub access, put the files there yourself:
#                       latentsync_unet.pt, whisper/tiny.pt, sd-vae-ft-mse/config.json and
#                       sd-vae-ft-mse/diffusion_pytorch_model.safetensors; nothing is
#                       downloaded when all four are present.
#   UNET_SHA256, WHISPER_SHA256, VAE_SHA256
#                       expected sha256 of the checkpoints; when set, a mismatch aborts
#   HF_ENDPOINT         Hugging Face mirror, as understood by huggingface_hub
#
# Needs python3 (>= 3.11) with venv, git (unless LATENTSYNC_SRC is given) and, without
# --random-weights, access to huggingface.co. Everything goes into .venv-export (torch,
# diffusers, ...; git-ignored), never into the project .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROFILE="${LATENTSYNC_PROFILE:-latentsync-1.5}"
PRECISION="${PRECISION:-auto}"
if [[ "$PRECISION" == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        PRECISION=fp16
    else
        PRECISION=fp32
    fi
fi
LATENTSYNC_REPO="${LATENTSYNC_REPO:-https://github.com/bytedance/LatentSync.git}"
LATENTSYNC_COMMIT="${LATENTSYNC_COMMIT:-a229c3948406bc2cf6eaf4873e662e70c6a04746}"  # checked here
VENV="$ROOT/.venv-export"
DEEPCACHE_VERSION=0.1.1   # the reference's requirements.txt pin
RANDOM_WEIGHTS=0
EXTRA=()

say() { printf 'make_models: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --random-weights) RANDOM_WEIGHTS=1 ;;
        --latentsync-src) LATENTSYNC_SRC="$2"; shift ;;
        --profile) PROFILE="$2"; shift ;;
        --precision) PRECISION="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done

case "$PROFILE" in
    latentsync-1.5) HF_REPO="ByteDance/LatentSync-1.5" ;;
    latentsync-1.6) HF_REPO="ByteDance/LatentSync-1.6" ;;
    *) die "LATENTSYNC_PROFILE must be latentsync-1.5 or latentsync-1.6, not '$PROFILE'" ;;
esac
case "$PRECISION" in fp32|fp16) ;; *) die "PRECISION must be fp32 or fp16, not '$PRECISION'" ;; esac

if [[ "$RANDOM_WEIGHTS" == 1 ]]; then
    OUT="${OUT:-$ROOT/.local/models-check/$PROFILE-$PRECISION}"
else
    OUT="${OUT:-$ROOT/models/generated/$PROFILE}"
fi

# 1. exporter venv (separate from .venv: torch must not enter the main set-up)
if ! { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import torch, diffusers, onnx, onnxruntime, DeepCache' 2>/dev/null; }; then
    say "creating $VENV (torch, diffusers, onnx: several GB from PyPI)"
    python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r "$ROOT/models/requirements-export.txt"
    # The reference's DeepCache helper, for the DeepCache graphs' check only. --no-deps: its
    # metadata asks for transformers, which neither the helper nor the exporter imports.
    "$VENV/bin/pip" install -q --no-deps "DeepCache==$DEEPCACHE_VERSION"
fi
PY="$VENV/bin/python"

# 2. LatentSync source (imported by the exporter, never copied into this repository)
if [[ -z "${LATENTSYNC_SRC:-}" ]]; then
    LATENTSYNC_SRC="$ROOT/.local/LatentSync"
    if [[ ! -d "$LATENTSYNC_SRC/.git" ]]; then
        command -v git >/dev/null || die "git not found (or set LATENTSYNC_SRC to a LatentSync checkout)"
        say "cloning $LATENTSYNC_REPO into $LATENTSYNC_SRC"
        git clone -q "$LATENTSYNC_REPO" "$LATENTSYNC_SRC"
    fi
    git -C "$LATENTSYNC_SRC" -c advice.detachedHead=false checkout -q "$LATENTSYNC_COMMIT" ||
        die "commit $LATENTSYNC_COMMIT not in $LATENTSYNC_SRC"
fi
[[ -f "$LATENTSYNC_SRC/latentsync/models/unet.py" ]] || die "$LATENTSYNC_SRC is not a LatentSync checkout"

ARGS=(--profile "$PROFILE" --precision "$PRECISION" --latentsync-src "$LATENTSYNC_SRC" --out "$OUT")

if [[ "$RANDOM_WEIGHTS" == 1 ]]; then
    say "random-weight check of $PROFILE $PRECISION into $OUT"
    exec nice "$PY" -W ignore "$ROOT/models/export/export.py" "${ARGS[@]}" --random-weights "${EXTRA[@]}"
fi

# 3. checkpoints
CKPT_DIR="${CKPT_DIR:-$ROOT/.local/checkpoints/$PROFILE}"
mkdir -p "$CKPT_DIR"
have_all=1
for f in latentsync_unet.pt whisper/tiny.pt sd-vae-ft-mse/config.json sd-vae-ft-mse/diffusion_pytorch_model.safetensors; do
    [[ -s "$CKPT_DIR/$f" ]] || have_all=0
done
if [[ "$have_all" == 1 ]]; then
    say "using the checkpoints already in $CKPT_DIR (no download)"
else
say "downloading $HF_REPO (latentsync_unet.pt, whisper/tiny.pt) and stabilityai/sd-vae-ft-mse into $CKPT_DIR"
"$PY" - "$HF_REPO" "$CKPT_DIR" <<'EOF' || die "download failed: does this machine reach huggingface.co (or HF_ENDPOINT)? Without it, copy the four files into $CKPT_DIR (see the header of this script)"
import sys
from huggingface_hub import hf_hub_download
repo, d = sys.argv[1], sys.argv[2]
for r, f in ((repo, "latentsync_unet.pt"), (repo, "whisper/tiny.pt"),
             ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors"),
             ("stabilityai/sd-vae-ft-mse", "config.json")):
    sub = "sd-vae-ft-mse" if r.startswith("stabilityai/") else ""
    print(hf_hub_download(r, f, local_dir=f"{d}/{sub}" if sub else d))
EOF
fi
UNET="$CKPT_DIR/latentsync_unet.pt"
WHISPER="$CKPT_DIR/whisper/tiny.pt"
VAE="$CKPT_DIR/sd-vae-ft-mse/diffusion_pytorch_model.safetensors"
for spec in "UNET_SHA256:$UNET" "WHISPER_SHA256:$WHISPER" "VAE_SHA256:$VAE"; do
    var="${spec%%:*}"; file="${spec#*:}"
    got="$(sha256sum "$file" | cut -d' ' -f1)"
    want="${!var:-}"
    if [[ -n "$want" && "$got" != "$want" ]]; then die "$file: sha256 $got, expected $want ($var)"; fi
    say "$(basename "$file"): sha256 $got${want:+ (matches $var)}"
done
# the VAE architecture is built from an inline copy of sd-vae-ft-mse's config: check it agrees
"$PY" - "$CKPT_DIR/sd-vae-ft-mse/config.json" <<'EOF' || die "sd-vae-ft-mse config.json differs from the exporter's inline copy"
import json, sys
sys.path.insert(0, "models/export")
from export import SD_VAE_FT_MSE_CONFIG
cfg = json.load(open(sys.argv[1]))
bad = {k: (v, cfg.get(k)) for k, v in SD_VAE_FT_MSE_CONFIG.items() if cfg.get(k) != v}
sys.exit(f"differs: {bad}" if bad else 0)
EOF

# 4. export + lock file + check against manifest.toml (--smoke: one run of each graph)
say "exporting $PROFILE $PRECISION into $OUT"
nice "$PY" -W ignore "$ROOT/models/export/export.py" "${ARGS[@]}" --smoke \
    --unet-ckpt "$UNET" --whisper-ckpt "$WHISPER" --vae-weights "$VAE" "${EXTRA[@]}"
say "done: $OUT/manifest.lock.toml; select it with LIPSYNC_MODELS__PROFILE=$PROFILE"
