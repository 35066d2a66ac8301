#!/usr/bin/env bash
# Infer stage benchmark (issue 5) with the `tiny` profile on this machine's CPU:
#   - ms per UNet step and per 16-frame chunk (20 DDIM steps, guidance 1.5 = CFG batch 2),
#   - the stage's duty cycle on a 60 s clip: time inside model runs / wall time (goal >= 95 %:
#     decoding, warping and encoding the crops must hide behind the model),
#   - the crops artifact codec (libx264 crf 8 yuv444p) against the lossless crops: PSNR
#     (goal >= 45 dB) and size (goal <= 5 MB per output second at 512 px), on the tiny
#     model's output (noise in the mouth: the worst case) and on a natural 512 px face clip.
# Set INFER_BENCH_SECONDS to change the clip length (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
cargo build --release -q -p lipsync-infer
bin=target/release/lipsync-infer
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
secs=${INFER_BENCH_SECONDS:-60}
export LIPSYNC_MODELS__PROFILE=tiny LIPSYNC_LOG__FILTER=error

ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=640x360:rate=25" -t "$secs" \
    -pix_fmt yuv420p "$work/clip.mp4"
echo "== pipeline: ${secs} s clip (640x360 test pattern, synthetic face track, random audio)"
"$bin" bench "$work/clip.mp4" --steps 20 --guidance 1.5 | tee "$work/run.txt"

# Codec check 1: the tiny model's real output, stored lossless (ffv1), then re-encoded
# exactly as the stage does and compared.
ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=640x360:rate=25" -t 10 \
    -pix_fmt yuv420p "$work/clip10.mp4"
LIPSYNC_INFER__CROPS_CODEC=ffv1 "$bin" bench "$work/clip10.mp4" --steps 4 \
    --out "$work/lossless.mkv" >/dev/null
# Codec check 2: natural face content at 512 px (the astronaut portrait, slowly moving).
portrait=tests/assets/generated/astronaut.png
if [[ -f "$portrait" ]]; then
    ffmpeg -nostdin -v error -y -loop 1 -framerate 25 -i "$portrait" -vf \
        "scale=512:512,zoompan=z='1.05+0.04*sin(on/20)':x='iw/2-(iw/zoom/2)+8*sin(on/13)':y='ih/2-(ih/zoom/2)':d=1:s=512x512:fps=25,format=rgb24" \
        -frames:v 250 -c:v ffv1 "$work/portrait.mkv"
fi
measure() { # lossless-input label -> prints "label psnr MB/s"
    local src=$1 label=$2
    ffmpeg -nostdin -v error -y -i "$src" -c:v libx264 -preset veryfast -crf 8 \
        -pix_fmt yuv444p -f matroska "$work/enc.mkv"
    local psnr frames bytes
    psnr=$(ffmpeg -nostdin -i "$work/enc.mkv" -i "$src" -lavfi "[0][1]psnr" -f null - 2>&1 |
        grep -oE 'average:[0-9.inf]+' | tail -1 | cut -d: -f2)
    frames=$(ffprobe -v error -count_frames -select_streams v:0 \
        -show_entries stream=nb_read_frames -of csv=p=0 "$work/enc.mkv")
    bytes=$(stat -c %s "$work/enc.mkv")
    python3 -c "print(f'  {\"$label\":<44}{float(\"$psnr\"):>8.2f} dB{$bytes/1e6/($frames/25):>9.2f} MB/s')"
}
echo
echo "== crops codec: libx264 -preset veryfast -crf 8 -pix_fmt yuv444p vs lossless"
echo "  content                                          PSNR     size/output s"
measure "$work/lossless.mkv" "tiny model output, 256 px (noise mouth)"
[[ -f "$work/portrait.mkv" ]] && measure "$work/portrait.mkv" "natural face clip, 512 px"
echo "  goals: >= 45 dB, <= 5 MB per output second at 512 px"
python3 - "$work/run.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
duty = float(re.search(r"duty cycle\s+([0-9.]+)", t).group(1))
step = float(re.search(r"ms per unet step\s+([0-9.]+)", t).group(1))
chunk = float(re.search(r"ms per chunk\s+([0-9.]+)", t).group(1))
print()
print("== summary (tiny profile, CPU)")
print(f"  {'figure':<30}{'measured':>12}{'goal':>12}")
print(f"  {'ms per UNet step (B=2, F=16)':<30}{step:>12.2f}{'-':>12}")
print(f"  {'ms per chunk (model time)':<30}{chunk:>12.1f}{'-':>12}")
print(f"  {'duty cycle':<30}{duty:>11.1f}%{'>= 95%':>12}")
PY
