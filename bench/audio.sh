#!/usr/bin/env bash
# Audio stage on a 10-minute file (issue 4): the real-time factor of mel + tiny Whisper
# encoder on the CPU, and the log-mel alone in Rust versus the NumPy implementation of the
# same recipe (stages/audio/tests/mel_ref.py) on the same file (goal: Rust >= 5x faster).
# Both mel timings include reading the 16 kHz WAV; best of 3 runs, same machine, same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
bash scripts/setup.d/30-audio-assets.sh
cargo build --release -q -p lipsync-audio
bin=target/release/lipsync-audio
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
secs=${AUDIO_BENCH_SECONDS:-600}
# Speech (espeak-ng) looped to the length, 16 kHz mono 16-bit like the stage's input.
ffmpeg -nostdin -v error -y -stream_loop -1 -i tests/assets/generated/speech_16k.wav \
    -t "$secs" -ac 1 -ar 16000 -c:a pcm_s16le "$work/long.wav"

best_rust=999999; best_numpy=999999; best_feat=999999
for run in 1 2 3; do
    out=$("$bin" --set models.profile=tiny mel "$work/long.wav" --out "$work/mel.npy" 2>&1)
    t=$(grep -oE 'in [0-9.]+ s' <<<"$out" | awk '{print $2}')
    best_rust=$(python3 -c "print(min($best_rust, $t))")
    t=$("$LIPSYNC_PYTHON" stages/audio/tests/mel_ref.py "$work/long.wav" \
        --filters tests/assets/generated/mel_filters.npz --time)
    best_numpy=$(python3 -c "print(min($best_numpy, $t))")
    out=$("$bin" --set models.profile=tiny features "$work/long.wav" --out "$work/f.npy" 2>&1)
    t=$(grep -oE 'in [0-9.]+ s' <<<"$out" | awk '{print $2}')
    best_feat=$(python3 -c "print(min($best_feat, $t))")
done
python3 - "$secs" "$best_rust" "$best_numpy" "$best_feat" "$(nproc)" <<'PY'
import sys
secs, rust, numpy, feat, cores = (float(x) for x in sys.argv[1:])
print(f"audio bench: {secs/60:.0f} min of 16 kHz speech, best of 3, {cores:.0f} cores (same run)")
print(f"  {'step':<40}{'seconds':>9}{'RTF':>9}")
print(f"  {'log-mel, NumPy (mel_ref.py)':<40}{numpy:>9.3f}{numpy/secs:>9.5f}")
print(f"  {'log-mel, Rust (lipsync-audio mel)':<40}{rust:>9.3f}{rust/secs:>9.5f}")
print(f"  {'mel + tiny encoder, CPU (features)':<40}{feat:>9.3f}{feat/secs:>9.5f}")
print(f"  Rust mel speed-up over NumPy: {numpy/rust:.1f}x (goal >= 5x)")
print(f"  real-time factor mel + tiny encoder: {feat/secs:.4f} ({secs/feat:.0f}x faster than real time)")
PY
