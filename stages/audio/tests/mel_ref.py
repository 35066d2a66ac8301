#!/usr/bin/env python3
"""Whisper's log-mel recipe in NumPy only (docs/architecture.md §9.3), as the reference the Rust
implementation is checked and benchmarked against.

    mel_ref.py AUDIO --filters mel_filters.npz --out mel.npy [--time]

AUDIO: a 16 kHz mono 16-bit WAV is read directly; anything else is decoded with ffmpeg
to s16le 16 kHz mono, as whisper.audio.load_audio does. Samples are int16 / 32768.
Steps mirror whisper.audio.log_mel_spectrogram in float32 like torch: periodic Hann(400),
centred STFT (reflect padding of 200), hop 160, last frame dropped, |X|^2, the 80-band
filters from mel_filters.npz, log10(clamp 1e-10), max(x, max - 8), (x + 4) / 4.
Writes float32 (80, frames). With --time, prints the seconds the computation took
(file reading included) on stdout.
"""

import argparse
import subprocess
import sys
import time
import wave

import numpy as np

N_FFT = 400
HOP = 160
SR = 16000


def load(path: str) -> np.ndarray:
    try:
        with wave.open(path, "rb") as w:
            if w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2:
                raw = w.readframes(w.getnframes())
                return np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
    except (wave.Error, EOFError):
        pass
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-threads", "0", "-i", path, "-f", "s16le", "-ac", "1",
         "-acodec", "pcm_s16le", "-ar", str(SR), "-"],
        capture_output=True, check=True,
    ).stdout
    return np.frombuffer(out, np.int16).astype(np.float32) / 32768.0


def log_mel(audio: np.ndarray, filters: np.ndarray) -> np.ndarray:
    n = np.arange(N_FFT, dtype=np.float32)
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    stft = np.fft.rfft(frames * window, axis=-1)  # (frames, 201)
    magnitudes = (np.abs(stft[:-1]) ** 2).astype(np.float32).T  # (201, frames-1)
    mel = filters @ magnitudes
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("audio")
    ap.add_argument("--filters", required=True)
    ap.add_argument("--out")
    ap.add_argument("--time", action="store_true")
    a = ap.parse_args()
    with np.load(a.filters) as f:
        filters = f["mel_80"].astype(np.float32)
    start = time.perf_counter()
    mel = log_mel(load(a.audio), filters)
    secs = time.perf_counter() - start
    if a.out:
        np.save(a.out, mel)
    if a.time:
        print(f"{secs:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
