#!/usr/bin/env bash
# Face stage benchmark (issue 4): `lipsync-face track` (release build, the stage's own
# streaming path) on clips made from the test portrait:
#   1. frames/s at 720p and 1080p for each detector, side by side with a NumPy +
#      onnxruntime baseline of the same RetinaFace model at the same input size
#      (ffmpeg pipe, per-frame run, same two cores), measured in the same run;
#   2. landmark jitter on a slow pan (std of eye/nose positions after removing the known
#      motion, in pixels) for each detector: the accuracy half of the default choice;
#   3. peak RSS (/usr/bin/time -v) on a short and a long 1080p clip, to show memory is
#      flat in video length (goal <= 1 GB). FACE_BENCH_LONG_S sets the long clip's
#      length (default 300 s = 5 minutes; the short one is 20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
bash scripts/setup.d/20-face-assets.sh
cargo build --release -q -p lipsync-face
bin=target/release/lipsync-face
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
portrait=tests/assets/generated/astronaut.png
long_s=${FACE_BENCH_LONG_S:-300}
export LIPSYNC_MODELS__PROFILE=tiny LIPSYNC_LOG__FILTER=error

# clip NAME W H SECONDS: the portrait scaled to the frame height, panning 2 px/frame.
clip() {
    local name=$1 w=$2 h=$3 secs=$4
    ffmpeg -nostdin -v error -y -f lavfi -i "color=c=0x808080:s=${w}x${h}:r=25:d=$secs" \
        -loop 1 -framerate 25 -i "$portrait" \
        -filter_complex "[1]scale=$h:$h[s];[0][s]overlay=x='mod(2*n\,$((w - h)))':y=0:shortest=1" \
        -c:v libx264 -preset ultrafast -crf 18 -pix_fmt yuv420p -t "$secs" "$work/$name.mp4"
}
clip c720 1280 720 8
clip c1080 1920 1080 8

# track NAME DETECTOR LABEL [extra env...]: tracks NAME.mp4 into NAME.LABEL.json and
# prints "fps rss_kb frames_without_face" (frames without a face pass through, so a
# detector that misses the face still gets a figure).
track() {
    local name=$1 det=$2 label=$3
    shift 3
    local out
    out=$( { env LIPSYNC_FACE__DETECTOR="$det" LIPSYNC_FACE__ON_MISSING=passthrough "$@" /usr/bin/time -v "$bin" track \
        "$work/$name.mp4" --out "$work/$name.$label.json"; } 2>&1 )
    local fps kb
    fps=$(grep -oE '\(([0-9.]+) frames/s\)' <<<"$out" | tr -d '(' | awk '{print $1}')
    kb=$(grep 'Maximum resident set size' <<<"$out" | awk '{print $NF}')
    miss=$(grep -oE '[0-9]+ without a face' <<<"$out" | awk '{print $1}')
    echo "$fps $kb ${miss:-?}"
}

python_baseline() { # python_baseline CLIP: RetinaFace in NumPy + onnxruntime, fps
    "$LIPSYNC_PYTHON" - "$1" <<'PY'
import subprocess, sys, time, json
import numpy as np, onnxruntime as ort
path = sys.argv[1]
info = json.loads(subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
    "stream=width,height", "-of", "json", path], capture_output=True).stdout)["streams"][0]
w, h = info["width"], info["height"]
s = 640 / max(w, h); k = int(1 / s)
iw, ih = -(-round(w * s) // 32) * 32, -(-round(h * s) // 32) * 32
sess = ort.InferenceSession("models/generated/face/retinaface_mnet025.onnx", providers=["CPUExecutionProvider"])
p = subprocess.Popen(["ffmpeg", "-v", "error", "-i", path, "-vf", "fps=25", "-pix_fmt", "rgb24", "-f", "rawvideo", "-"],
    stdout=subprocess.PIPE)
n = 0; t0 = time.time(); mean = np.array([104, 117, 123], np.float32)
while True:
    buf = p.stdout.read(w * h * 3)
    if len(buf) < w * h * 3: break
    f = np.frombuffer(buf, np.uint8).reshape(h, w, 3)
    if k > 1:
        f = f[: h // k * k, : w // k * k].reshape(h // k, k, w // k, k, 3).mean((1, 3))
    x = np.zeros((ih, iw, 3), np.float32)
    hh, ww = min(ih, f.shape[0]), min(iw, f.shape[1])
    x[:hh, :ww] = f[:hh, :ww, ::-1] - mean
    sess.run(None, {"input": x.transpose(2, 0, 1)[None].copy()})
    n += 1
print(f"{n / (time.time() - t0):.1f}")
PY
}

declare -A fps rss
for c in c720 c1080; do
    for d in retinaface blazeface blazeface-back; do
        read -r f k m < <(track "$c" "$d" "$d")
        fps[$c.$d]="$f"
        ((m == 0)) || fps[$c.$d]="$f (no face in $m frames)"
        rss[$c.$d]=$k
    done
    read -r f k _ < <(track "$c" retinaface noref LIPSYNC_FACE__REFINE_LANDMARKS=false)
    fps[$c.noref]=$f
    fps[$c.py]=$(python_baseline "$work/$c.mp4")
done

# Jitter on the 720p pan: residual std of eyes and nose after removing the 2 px/frame pan.
jitter() {
    "$LIPSYNC_PYTHON" - "$1" <<'PY'
import json, sys, numpy as np
t = json.load(open(sys.argv[1]))
fr = [f for f in t["frames"] if f["present"] and not f["interpolated"]]
out = []
for k in range(3):
    xs = np.array([f["landmarks"][k][0] for f in fr]) - 2 * np.arange(len(fr))
    ys = np.array([f["landmarks"][k][1] for f in fr])
    # The pan wraps with mod(): drop the jump by using the median absolute deviation.
    out.append(np.hypot(np.median(np.abs(xs - np.median(xs))), np.median(np.abs(ys - np.median(ys)))) * 1.4826)
print(f"{np.mean(out):.2f}")
PY
}
declare -A jit
for d in retinaface noref blazeface blazeface-back; do jit[$d]=$(jitter "$work/c720.$d.json"); done

# Memory flatness: a short and a long 1080p clip.
clip short1080 1920 1080 20
clip long1080 1920 1080 "$long_s"
read -r fs ks _ < <(track short1080 retinaface retinaface)
read -r fl kl _ < <(track long1080 retinaface retinaface)

cat <<EOF
face bench ($(nproc) cores; lipsync-face track, release; baseline: NumPy + onnxruntime,
same RetinaFace model at the same 640 px input, no refinement pass)
  frames/s                      720p                         1080p
  retinaface (default, refined) $(printf '%-28s %s' "${fps[c720.retinaface]}" "${fps[c1080.retinaface]}")
  retinaface, no refinement     $(printf '%-28s %s' "${fps[c720.noref]}" "${fps[c1080.noref]}")
  blazeface (128 px)            $(printf '%-28s %s' "${fps[c720.blazeface]}" "${fps[c1080.blazeface]}")
  blazeface-back (256 px)       $(printf '%-28s %s' "${fps[c720.blazeface-back]}" "${fps[c1080.blazeface-back]}")
  baseline python retinaface    $(printf '%-28s %s' "${fps[c720.py]}" "${fps[c1080.py]}")
  landmark jitter on a 720p pan (robust std of eyes+nose, px; lower is steadier):
    retinaface refined ${jit[retinaface]}, unrefined ${jit[noref]}, blazeface ${jit[blazeface]}, blazeface-back ${jit[blazeface-back]}
  peak RSS 1080p: 20 s clip $((ks / 1024)) MB ($fs frames/s), ${long_s} s clip $((kl / 1024)) MB ($fl frames/s) (goal <= 1024 MB, flat)
EOF
