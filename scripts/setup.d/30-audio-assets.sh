#!/usr/bin/env bash
# lipsync-setup: test   (scripts/setup.sh runs this step only with --test: `make test`)
# Audio-stage test assets (git-ignored, never committed):
#   tests/assets/generated/mel_filters.npz
#       Whisper's 80/128-band mel filter bank, `whisper/assets/mel_filters.npz` of the
#       PyPI sdist openai-whisper 20250625 (pip download --no-deps; sha256-checked).
#       The Rust filter bank is checked against it.
#   tests/assets/generated/speech_16k.wav
#       a few seconds of English speech made with espeak-ng, resampled to 16 kHz mono
#       16-bit PCM by ffmpeg (the mel tests compare Rust and NumPy on it).
# Idempotent and quiet: a stamp keyed on this script skips the work while the outputs
# are present (and the npz has the pinned checksum).
set -euo pipefail

PY="${LIPSYNC_PYTHON:-.venv/bin/python}"
ASSETS=tests/assets/generated
WHISPER_VERSION=20250625
SDIST_SHA=37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96
NPZ_SHA=7450ae70723a5ef9d341e3cee628c7cb0177f36ce42c44b7ed2bf3325f0f6d4c
npz="$ASSETS/mel_filters.npz"
speech="$ASSETS/speech_16k.wav"

sha_ok() { # sha_ok FILE SHA
    [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

stamp="$ASSETS/.audio-stamp"
want="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && sha_ok "$npz" "$NPZ_SHA" &&
    [[ -s "$speech" ]]; then
    exit 0
fi

mkdir -p "$ASSETS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log"

fail() {
    echo "30-audio-assets: ERROR: $*" >&2
    [[ -f "$log" ]] && tail -n 20 "$log" >&2
    exit 1
}

if ! sha_ok "$npz" "$NPZ_SHA"; then
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download --no-input -q --no-deps \
        "openai-whisper==$WHISPER_VERSION" -d "$work" >"$log" 2>&1 ||
        fail "pip download openai-whisper==$WHISPER_VERSION failed"
    sdist="$work/openai_whisper-$WHISPER_VERSION.tar.gz"
    sha_ok "$sdist" "$SDIST_SHA" || fail "openai-whisper sdist checksum differs"
    tar -xzf "$sdist" -C "$work" "openai_whisper-$WHISPER_VERSION/whisper/assets/mel_filters.npz" ||
        fail "mel_filters.npz not found in the sdist"
    got="$work/openai_whisper-$WHISPER_VERSION/whisper/assets/mel_filters.npz"
    sha_ok "$got" "$NPZ_SHA" || fail "mel_filters.npz checksum differs"
    cp "$got" "$npz.tmp" && mv -f "$npz.tmp" "$npz"
fi

if [[ ! -s "$speech" ]]; then
    command -v espeak-ng >/dev/null 2>&1 || fail "espeak-ng is missing (run scripts/setup.sh)"
    espeak-ng -s 150 -w "$work/speech.wav" \
        "The quick brown fox jumps over the lazy dog. Lip sync needs clear speech, with pauses, plosives and sibilants: papa, bob, sister, fish." \
        >"$log" 2>&1 || fail "espeak-ng failed"
    ffmpeg -nostdin -v error -y -i "$work/speech.wav" -ac 1 -ar 16000 -c:a pcm_s16le \
        "$work/speech_16k.wav" >"$log" 2>&1 || fail "ffmpeg resampling failed"
    mv -f "$work/speech_16k.wav" "$speech"
fi

echo "$want" >"$stamp"
