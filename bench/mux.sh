#!/usr/bin/env bash
# Mux stage throughput versus a bare `ffmpeg -i in -c:v libx264 -crf 18` re-encode of the
# same clip, measured in the same run, for 720p and 1080p; then peak RSS of the mux
# pipeline on a long 1080p clip (ping-pong past the end, so backward windows are re-decoded).
# The mux run does everything the stage does per frame: decode the original, decode the
# 512 px crops, resize + inverse-warp + soft-mask blend, encode the result (crf 18,
# preset medium, AAC) and the mask video.
# Knobs: MUX_BENCH_SECS (clip length, default 10), MUX_BENCH_LONG_SECS (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
. bench/lib.sh
mux_bench_setup
secs=${MUX_BENCH_SECS:-10}
long=${MUX_BENCH_LONG_SECS:-300}

# make_inputs NAME W H SECONDS OUTPUT_FRAMES: clip, 16 kHz WAV, face track, crops.
make_inputs() {
    local name=$1 w=$2 h=$3 s=$4 out=$5
    ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=${w}x${h}:rate=25:duration=$s" \
        -f lavfi -i "sine=frequency=440:duration=$s" -c:v libx264 -crf 16 -preset veryfast \
        -pix_fmt yuv420p -c:a aac -shortest "$work/$name.mp4"
    ffmpeg -nostdin -v error -y -f lavfi -i "sine=frequency=300:duration=$(python3 -c "print($out/25)"):sample_rate=16000" \
        "$work/$name.wav"
    ffmpeg -nostdin -v error -y -f lavfi -i "color=c=0xDC1E1E:s=512x512:r=25" -frames:v "$out" \
        -c:v ffv1 -pix_fmt bgr0 "$work/$name-crops.mkv"
    face_track "$w" "$h" "$((s * 25))" >"$work/$name.json"
}

# run_mux NAME FRAMES MODE -> prints "seconds own_peak_kb tree_peak_kb": the mux process's
# own peak RSS, and the peak of the summed RSS of it and its ffmpeg children (sampled
# every 0.2 s).
run_mux() {
    local out
    out=$(LIPSYNC_LOG__FILTER=error python3 - "$bin" render --video "$work/$1.mp4" \
        --track "$work/$1.json" --crops "$work/$1-crops.mkv" --audio "$work/$1.wav" \
        --frames "$2" --mode "$3" --out "$work/$1-result.mp4" --mask "$work/$1-mask.mp4" <<'PY'
import os, subprocess, sys, time
sys.path.insert(0, "bench")
from procs import tree_rss
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
peak = 0
while p.poll() is None:
    peak = max(peak, tree_rss(p.pid))
    time.sleep(0.2)
out = p.stdout.read()
if p.returncode != 0:
    sys.exit(f"mux render failed ({p.returncode}): {out}")
print(out.strip())
print(f"tree peak {peak}")
PY
) || { echo "$out" >&2; exit 1; }
    local t own tree
    t=$(grep -oE 'in [0-9.]+ s' <<<"$out" | awk '{print $2}')
    own=$(grep -oE 'peak rss [0-9]+' <<<"$out" | awk '{print $3}')
    tree=$(grep -oE 'tree peak [0-9]+' <<<"$out" | awk '{print $3}')
    echo "$t $own $tree"
}

run_bare() {
    local start end
    start=$(date +%s.%N)
    ffmpeg -nostdin -v error -y -i "$work/$1.mp4" -c:v libx264 -crf 18 "$work/$1-bare.mp4"
    end=$(date +%s.%N)
    python3 -c "print($end - $start)"
}

frames=$((secs * 25))
rows=()
for spec in "720p 1280 720" "1080p 1920 1080"; do
    read -r name w h <<<"$spec"
    make_inputs "$name" "$w" "$h" "$secs" "$frames"
    # Best of two interleaved runs each: the machine may be shared.
    bare=999999; ours=999999; own=0; tree=0
    for _ in 1 2; do
        b=$(run_bare "$name")
        read -r o ow tr < <(run_mux "$name" "$frames" cut)
        bare=$(python3 -c "print(min($bare, $b))")
        ours=$(python3 -c "print(min($ours, $o))")
        own=$(python3 -c "print(max($own, $ow))")
        tree=$(python3 -c "print(max($tree, $tr))")
    done
    rows+=("$name $bare $ours $own $tree")
done

long_frames=$((long * 25 * 6 / 5))
make_inputs long 1920 1080 "$long" "$long_frames"
read -r long_t long_own long_tree < <(run_mux long "$long_frames" pingpong)

python3 - "$frames" "$long" "$long_frames" "$long_t" "$long_own" "$long_tree" "${rows[@]}" <<'PY'
import sys
frames, long_s, long_frames = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
long_t, long_own, long_tree = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
print(f"mux bench: {frames} frames per clip, best of 2 interleaved runs, same machine, same run")
print(f"  {'clip':<7}{'bare ffmpeg fps':>17}{'lipsync-mux fps':>17}{'time ratio':>12}{'RSS mux':>10}{'RSS +ffmpeg':>13}")
for row in sys.argv[7:]:
    name, bare, ours, own, tree = row.split()
    bare, ours, own, tree = float(bare), float(ours), float(own), float(tree)
    print(f"  {name:<7}{frames / bare:>17.1f}{frames / ours:>17.1f}{ours / bare:>11.2f}x{own / 1024:>7.0f} MB{tree / 1024:>10.0f} MB")
print(f"  (bare = ffmpeg -i in -c:v libx264 -crf 18: decode + encode only;")
print(f"   lipsync-mux = decode video + crops, blend, encode result (crf 18, medium) + mask video)")
print(f"  long 1080p: {long_s} s video, {long_frames} output frames (ping-pong past the end):")
print(f"    {long_t:.1f} s, {long_frames / long_t:.1f} frames/s; peak RSS: lipsync-mux {long_own / 1024:.0f} MB,")
print(f"    with its ffmpeg decoders and x264 encoders {long_tree / 1024:.0f} MB (goal <= 1 GB)")
PY
