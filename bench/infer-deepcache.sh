#!/usr/bin/env bash
# DeepCache benchmark: seconds per UNet step, exact vs DeepCache (interval 3, the
# reference's demo setting), side by side, on this machine's CPU.
#   1. The tiny profile through `lipsync-infer bench --deepcache 0,3` on a 20 s clip (20
#      DDIM steps, CFG batch 2, 16-frame chunks): ms per step of each kind, mean ms per
#      step, seconds per output second, duty cycle.
#   2. BENCH_REAL=1: the real LatentSync 1.5 architecture (random weights) exported by
#      `make models-check` into .local/models-check/latentsync-1.5-fp32: one UNet step
#      (B=2 CFG batch, F=2, 32x32 latents) of the exact graph, the DeepCache full graph and
#      the shallow graph in ONNX Runtime CPU, and the mean per step at interval 3. Off by
#      default: session creation alone takes about a minute and 10 GB of RAM.
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
cargo build --release -q -p lipsync-infer
bin=target/release/lipsync-infer
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export LIPSYNC_MODELS__PROFILE=tiny LIPSYNC_LOG__FILTER=error
ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=640x360:rate=25" -t 20 \
    -pix_fmt yuv420p "$work/clip.mp4"
echo "== tiny profile, 20 s clip: exact vs DeepCache interval 3"
"$bin" bench "$work/clip.mp4" --steps 20 --guidance 1.5 --deepcache 0,3 | tee "$work/run.txt" |
    sed -n '/^== side by side/,$p'
grep -E '^(ms per (unet step|full step|shallow)|== deepcache)' "$work/run.txt"

real=.local/models-check/latentsync-1.5-fp32
if [[ "${BENCH_REAL:-0}" == 1 ]]; then
    [[ -f "$real/unet_deepcache_shallow.onnx" ]] || { echo "no $real: run make models-check first" >&2; exit 1; }
    echo "== LatentSync 1.5 architecture, random weights, ONNX Runtime CPU, B=2 F=2 32x32"
    "$LIPSYNC_PYTHON" - "$real" <<'PY'
import sys, time
import numpy as np
import onnxruntime as ort
d = sys.argv[1]
o = ort.SessionOptions(); o.log_severity_level = 3
rs = np.random.RandomState(0)
feeds = {"sample": rs.standard_normal((2, 13, 2, 32, 32)).astype(np.float32),
         "timestep": np.array([951], dtype=np.int64),
         "encoder_hidden_states": rs.standard_normal((4, 50, 384)).astype(np.float32)}
def timed(name, f):
    s = ort.InferenceSession(f"{d}/{name}", o, providers=["CPUExecutionProvider"])
    out = s.run(None, f)
    t0 = time.perf_counter(); out = s.run(None, f); dt = time.perf_counter() - t0
    del s
    return dt, out
exact, _ = timed("unet.onnx", feeds)
full, (_, deep) = timed("unet_deepcache_full.onnx", feeds)
shallow, _ = timed("unet_deepcache_shallow.onnx", dict(feeds, deep_feature=deep))
mean = (full + 2 * shallow) / 3
print(f"exact       {exact:7.2f} s/step")
print(f"full        {full:7.2f} s/step")
print(f"shallow     {shallow:7.2f} s/step")
print(f"deepcache 3 {mean:7.2f} s/step (mean of F S S)  {exact / mean:.2f}x")
PY
fi
