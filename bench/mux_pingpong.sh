#!/usr/bin/env bash
# Ping-pong render of a 1080p video shorter than its audio (default 2 minutes of video,
# 4 minutes of audio, so every frame is revisited backwards), with `lipsync-mux render`.
# Backward laps are re-decoded from the source into an in-memory window
# (`mux.pingpong_window_bytes`), so the render writes no scratch to disk.
# Prints, beside the baselines: the disk scratch peak (every file under the work folder
# other than the inputs and the two outputs, TMPDIR included, sampled every 0.5 s), the
# peak RSS of lipsync-mux itself (VmHWM) and of it with its ffmpeg children (summed,
# sampled), the wall time and the decoder runs.
# Baselines: a raw RGB spool, W*H*3 bytes per revisited frame (19 GB for 2 minutes of
# 1080p), and the lossless compressed spool (x264 RGB qp 0) the stage used before, which
# measured 2.45 GB for 20 s video + 40 s audio of this clip and stopped at its 8 GiB
# scratch cap on 2 min + 4 min.
# The clip is testsrc2 with temporal noise (camera-like, hard to compress).
# Knobs: PINGPONG_VIDEO_S (default 120), PINGPONG_AUDIO_S (default 240),
# PINGPONG_SIZE (default 1920x1080), PINGPONG_WINDOW_BYTES (default: the config's).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
. bench/lib.sh
mux_bench_setup
vs=${PINGPONG_VIDEO_S:-120}
as=${PINGPONG_AUDIO_S:-240}
size=${PINGPONG_SIZE:-1920x1080}
w=${size%x*}
h=${size#*x}
frames=$((as * 25))
if [ -n "${PINGPONG_WINDOW_BYTES:-}" ]; then
    export LIPSYNC_MUX__PINGPONG_WINDOW_BYTES=$PINGPONG_WINDOW_BYTES
fi
mkdir -p "$work/in" "$work/out" "$work/tmp"
ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=$size:rate=25:duration=$vs" \
    -vf "noise=alls=12:allf=t" -c:v libx264 -crf 18 -preset veryfast -pix_fmt yuv420p \
    "$work/in/v.mp4"
ffmpeg -nostdin -v error -y -f lavfi -i "sine=frequency=300:duration=$as:sample_rate=16000" \
    "$work/in/a.wav"
ffmpeg -nostdin -v error -y -f lavfi -i "color=c=0xDC1E1E:s=512x512:r=25" -frames:v "$frames" \
    -c:v ffv1 -pix_fmt bgr0 "$work/in/crops.mkv"
face_track "$w" "$h" "$((vs * 25))" >"$work/in/track.json"
TMPDIR="$work/tmp" LIPSYNC_LOG__FILTER=error python3 - "$work" "$vs" "$as" "$w" "$h" "$bin" \
    render --video "$work/in/v.mp4" --track "$work/in/track.json" \
    --crops "$work/in/crops.mkv" --audio "$work/in/a.wav" --frames "$frames" --mode pingpong \
    --out "$work/out/result.mp4" --mask "$work/out/mask.mp4" <<'PY'
import os, re, subprocess, sys, time
sys.path.insert(0, "bench")
from procs import tree_rss
work, vs, aus, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cmd = sys.argv[6:]
outputs = {os.path.join(work, "out", n) for n in ("result.mp4", "mask.mp4")}
inputs = os.path.join(work, "in")


def scratch_bytes():
    total = 0
    for d, _, files in os.walk(work):
        if d == inputs or d.startswith(inputs + os.sep):
            continue
        for n in files:
            p = os.path.join(d, n)
            if p in outputs:
                continue
            try:
                total += os.lstat(p).st_blocks * 512
            except OSError:
                pass
    return total

start = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
tree = disk = 0
while p.poll() is None:
    tree = max(tree, tree_rss(p.pid))
    disk = max(disk, scratch_bytes())
    time.sleep(0.5)
wall = time.monotonic() - start
out = p.stdout.read().strip()
print(out)
if p.returncode != 0:
    sys.exit(f"mux render failed ({p.returncode})")
own = int(re.search(r"peak rss (\d+) kB", out).group(1))
decodes = int(re.search(r"(\d+) video decode", out).group(1))
m = re.search(r"ping-pong window (\d+) frames \((\d+) bytes\)", out)
wf, wb = int(m.group(1)), int(m.group(2))
n = vs * 25
revisited = min(n, aus * 25 - n)
raw = w * h * 3 * revisited
old = "2.45 GB (measured)" if (vs, aus, w, h) == (20, 40, 1920, 1080) else (
    "stopped at its 8 GiB cap (input_too_long)" if (vs, aus, w, h) == (120, 240, 1920, 1080)
    else "not measured at this size")
print(f"ping-pong {w}x{h}, {vs} s video, {aus} s audio ({revisited} frames revisited):")
print(f"  disk scratch peak   {disk/1e9:8.3f} GB   ({disk} bytes) | raw RGB spool {raw/1e9:.2f} GB; "
      f"compressed spool {old}")
print(f"  backward window     {wb/1e6:8.1f} MB   ({wf} frames; {decodes} video decodes)")
print(f"  peak RSS            {own/1e3:8.1f} MB own, {tree/1e3:.1f} MB with its ffmpeg children")
print(f"  wall time           {wall:8.1f} s")
PY
