#!/usr/bin/env bash
# Scratch of a ping-pong render: a 1080p video shorter than its audio (default 2 minutes of
# video, 4 minutes of audio, so every frame is revisited backwards), rendered with
# `lipsync-mux render`, which prints the ping-pong spool's scratch peak (lossless
# compressed segments + one raw window). Baseline: the raw RGB spool the stage used
# before, W*H*3 bytes per revisited frame (19 GB for 2 minutes of 1080p). The clip is
# testsrc2 with temporal noise (camera-like: the spool's compression gets no free ride).
# Knobs: PINGPONG_VIDEO_S (default 120), PINGPONG_AUDIO_S (default 240),
# PINGPONG_SIZE (default 1920x1080).
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
ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=$size:rate=25:duration=$vs" \
    -vf "noise=alls=12:allf=t" -c:v libx264 -crf 18 -preset veryfast -pix_fmt yuv420p \
    "$work/v.mp4"
ffmpeg -nostdin -v error -y -f lavfi -i "sine=frequency=300:duration=$as:sample_rate=16000" \
    "$work/a.wav"
ffmpeg -nostdin -v error -y -f lavfi -i "color=c=0xDC1E1E:s=512x512:r=25" -frames:v "$frames" \
    -c:v ffv1 -pix_fmt bgr0 "$work/crops.mkv"
face_track "$w" "$h" "$((vs * 25))" >"$work/track.json"
out=$(LIPSYNC_LOG__FILTER=error "$bin" render --video "$work/v.mp4" --track "$work/track.json" \
    --crops "$work/crops.mkv" --audio "$work/a.wav" --frames "$frames" --mode pingpong \
    --out "$work/result.mp4" --mask "$work/mask.mp4")
echo "$out"
peak=$(sed -n 's/.*scratch peak \([0-9]*\) bytes.*/\1/p' <<<"$out")
raw=$((w * h * 3 * vs * 25))
python3 - "$peak" "$raw" "$vs" "$as" "$size" <<'PY'
import sys
peak, raw, vs, aus, size = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
print(f"ping-pong {size}, {vs} s video, {aus} s audio: scratch peak {peak/1e9:.2f} GB "
      f"(raw RGB spool: {raw/1e9:.1f} GB, {raw/max(peak,1):.1f}x less)")
PY
