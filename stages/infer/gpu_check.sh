#!/usr/bin/env bash
# Prepared device check of the infer stage's CUDA path (issue 5). NOT run in the session
# that wrote it (no GPU there). Run it from the repository root on a machine with an
# NVIDIA GPU:
#
#   bash stages/infer/gpu_check.sh
#
# What it does
#   1. makes a temporary venv with onnxruntime-gpu (+ the CUDA/cuDNN runtime wheels).
#      Offline machines: put the wheels in a folder and set ORT_GPU_WHEELS=/that/folder
#      (pip download 'onnxruntime-gpu[cuda,cudnn]==1.31.*' -d /that/folder on a machine
#      with network access);
#   2. uses target/release/lipsync-infer if it was built with `--features cuda`
#      (LIPSYNC_INFER_BIN=path overrides), else builds it (needs cargo);
#   3. needs the tiny profile in models/generated/tiny (`make setup`, or copy it);
#   4. runs `lipsync-infer bench` on a 20 s clip with infer.device = cuda (refuses to
#      fall back to CPU) and prints the provider, the timings, the peak GPU memory
#      (nvidia-smi, sampled every 100 ms) and UNet steps per second; then the same run on
#      the CPU for comparison.
# Budget: about 3-5 minutes (venv ~1-2 min, runs < 1 min each).
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_VERSION=${ORT_VERSION:-1.31.1}
work="$(mktemp -d)"
sampler=""
trap '[[ -n "$sampler" ]] && kill "$sampler" 2>/dev/null; rm -rf "$work"' EXIT

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== onnxruntime-gpu $ORT_VERSION into a temporary venv"
python3 -m venv "$work/venv"
pip=("$work/venv/bin/pip" install -q)
if [[ -n "${ORT_GPU_WHEELS:-}" ]]; then
    pip+=(--no-index --find-links "$ORT_GPU_WHEELS")
fi
"${pip[@]}" "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" || "${pip[@]}" "onnxruntime-gpu==$ORT_VERSION"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dylib=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -1)
# CUDA/cuDNN libraries shipped as nvidia-* wheels.
ld=""
for d in "$site"/nvidia/*/lib; do [[ -d "$d" ]] && ld="$d:$ld"; done
export LD_LIBRARY_PATH="${ld}${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH="$dylib"
"$work/venv/bin/python" -c 'import onnxruntime as o; print("providers:", o.get_available_providers())'

bin=${LIPSYNC_INFER_BIN:-target/release/lipsync-infer}
if [[ -z "${LIPSYNC_INFER_BIN:-}" ]]; then
    echo "== building lipsync-infer --features cuda"
    cargo build --release -q -p lipsync-infer --features cuda
fi
[[ -f models/generated/tiny/unet.onnx ]] || { echo "models/generated/tiny missing: run make setup" >&2; exit 1; }

ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=640x360:rate=25" -t 20 \
    -pix_fmt yuv420p "$work/clip.mp4"

export LIPSYNC_MODELS__PROFILE=tiny LIPSYNC_LOG__FILTER=info
echo "== CUDA run (infer.device = cuda)"
(while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.1; done) \
    >"$work/mem.txt" 2>/dev/null &
sampler=$!
LIPSYNC_INFER__DEVICE=cuda "$bin" bench "$work/clip.mp4" --steps 20 --guidance 1.5 | tee "$work/cuda.txt"
kill "$sampler" 2>/dev/null || true
sampler=""
peak=$(sort -n "$work/mem.txt" | tail -1)
echo "peak GPU memory used: ${peak} MiB (whole GPU, sampled every 100 ms)"

echo "== CPU run on the same machine (infer.device = cpu)"
LIPSYNC_INFER__DEVICE=cpu LIPSYNC_LOG__FILTER=warn "$bin" bench "$work/clip.mp4" --steps 20 --guidance 1.5 | tee "$work/cpu.txt"

python3 - "$work/cuda.txt" "$work/cpu.txt" <<'PY'
import re, sys
def fig(path, key):
    return float(re.search(key + r"\s+([0-9.]+)", open(path).read()).group(1))
print("== summary (tiny profile, 20 steps, CFG batch 2, 16-frame chunks)")
for name, path in (("cuda", sys.argv[1]), ("cpu", sys.argv[2])):
    prov = re.search(r"provider\s+(\S+)", open(path).read()).group(1)
    step = fig(path, "ms per unet step")
    print(f"  {name:<5} provider {prov:<8} {step:8.2f} ms/UNet step  {1000/step:8.1f} steps/s"
          f"  duty cycle {fig(path, 'duty cycle'):5.1f} %")
PY
