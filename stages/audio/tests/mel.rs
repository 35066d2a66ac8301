//! The Rust log-mel against Whisper's own assets and a NumPy transcription of its recipe
//! (tests/mel_ref.py, run with $LIPSYNC_PYTHON): the filter bank against the
//! `mel_filters.npz` of the openai-whisper sdist, and the spectrogram on espeak-ng speech,
//! on noise (with silence, to exercise the floor) and through the `mel` command on a
//! non-16 kHz input. Assets come from scripts/setup.d/30-audio-assets.sh (`make setup`).

use std::path::{Path, PathBuf};
use std::process::Command;

use lipsync_audio::extract;
use lipsync_audio::mel::{N_BINS, N_FFT, N_MELS, SAMPLE_RATE, mel_filters};
use ndarray::{Array2, Ix2};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn asset(name: &str) -> PathBuf {
    let p = root().join("tests/assets/generated").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make setup` (scripts/setup.d/30-audio-assets.sh)",
        p.display()
    );
    p
}

fn python() -> String {
    std::env::var("LIPSYNC_PYTHON").unwrap_or_else(|_| {
        let venv = root().join(".venv/bin/python");
        assert!(venv.exists(), "set LIPSYNC_PYTHON (`. .local/env.sh`)");
        venv.to_string_lossy().into_owned()
    })
}

/// Runs the NumPy reference on `audio` and returns its (80, frames) mel.
fn numpy_mel(audio: &Path) -> Array2<f32> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.npy");
    let st = Command::new(python())
        .arg(root().join("stages/audio/tests/mel_ref.py"))
        .arg(audio)
        .arg("--filters")
        .arg(asset("mel_filters.npz"))
        .arg("--out")
        .arg(&out)
        .status()
        .expect("python runs");
    assert!(st.success(), "mel_ref.py failed");
    ndarray_npy::read_npy(&out).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rust_mel(audio: &Path) -> Array2<f32> {
    let spec = extract::mel_of_file(Path::new("ffmpeg"), audio).unwrap();
    Array2::from_shape_vec((N_MELS, spec.frames), spec.normalized()).unwrap()
}

fn compare(audio: &Path) -> f32 {
    let want = numpy_mel(audio);
    let got = rust_mel(audio);
    assert_eq!(got.dim(), want.dim(), "shape");
    let err = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    eprintln!(
        "{}: {:?}, max abs error {err:e}",
        audio.display(),
        got.dim()
    );
    err
}

fn write_wav(path: &Path, rate: u32, samples: &[i16]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

/// Deterministic white noise (xorshift), with a silent stretch and a quiet stretch so
/// that the floor at max - 8 and the 1e-10 clamp both matter.
fn noise(seconds: f64) -> Vec<i16> {
    let n = (seconds * f64::from(SAMPLE_RATE)) as usize;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            let gain = match i * 10 / n {
                3 => 0.0,    // digital silence
                6 => 0.0005, // very quiet
                _ => 0.6,
            };
            (u * gain * 32767.0) as i16
        })
        .collect()
}

#[test]
fn filters_match_whisper_npz() {
    let file = std::fs::File::open(asset("mel_filters.npz")).unwrap();
    let mut npz = ndarray_npy::NpzReader::new(file).unwrap();
    let want: ndarray::Array<f32, Ix2> = npz.by_name("mel_80").unwrap();
    assert_eq!(want.dim(), (N_MELS, N_BINS));
    let got: Vec<f32> = mel_filters(SAMPLE_RATE, N_FFT, N_MELS)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let err = max_abs_diff(&got, want.as_slice().unwrap());
    let peak = want.iter().cloned().fold(0.0, f32::max);
    eprintln!("filter bank: max abs error {err:e} (largest weight {peak})");
    assert!(err <= 1e-7, "filter bank differs by {err}");
}

#[test]
fn mel_matches_numpy_on_speech() {
    let err = compare(&asset("speech_16k.wav"));
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn mel_matches_numpy_on_noise() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.wav");
    write_wav(&path, SAMPLE_RATE, &noise(3.217));
    let err = compare(&path);
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn mel_command_decodes_any_input_like_whisper() {
    // 44.1 kHz stereo AAC: the command brings it to 16 kHz mono with ffmpeg, as the
    // reference's load_audio does, before the same mel.
    let dir = tempfile::tempdir().unwrap();
    let m4a = dir.path().join("speech.m4a");
    let st = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-i"])
        .arg(asset("speech_16k.wav"))
        .args(["-ar", "44100", "-ac", "2", "-c:a", "aac"])
        .arg(&m4a)
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.path().join("mel.npy");
    let st = Command::new(env!("CARGO_BIN_EXE_lipsync-audio"))
        .current_dir(root())
        .arg("mel")
        .arg(&m4a)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "lipsync-audio mel failed");
    let got: Array2<f32> = ndarray_npy::read_npy(&out).unwrap();
    let want = numpy_mel(&m4a);
    assert_eq!(got.dim(), want.dim());
    let err = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn too_short_and_invalid_inputs_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.wav");
    write_wav(&short, SAMPLE_RATE, &noise(0.03));
    let e = extract::mel_of_wav(&short).unwrap_err();
    assert!(matches!(e, lipsync_audio::Error::TooShort { .. }), "{e}");
    assert_eq!(e.code(), lipsync_schemas::ErrorCode::UnsupportedMedia);

    let text = dir.path().join("text.wav");
    std::fs::write(&text, b"not a wav file at all".repeat(50)).unwrap();
    let e = extract::mel_of_wav(&text).unwrap_err();
    assert!(
        matches!(e, lipsync_audio::Error::UnsupportedMedia(_)),
        "{e}"
    );
    assert!(!e.to_string().contains(dir.path().to_str().unwrap()));

    let e = extract::mel_of_file(Path::new("ffmpeg"), &text).unwrap_err();
    assert!(
        matches!(e, lipsync_audio::Error::UnsupportedMedia(_)),
        "{e}"
    );
    assert!(!e.to_string().contains(dir.path().to_str().unwrap()), "{e}");

    let other_rate = dir.path().join("mono48k.wav");
    write_wav(&other_rate, 48_000, &noise(1.5)); // 0.5 s
    assert!(matches!(
        extract::mel_of_wav(&other_rate).unwrap_err(),
        lipsync_audio::Error::UnsupportedMedia(_)
    ));
    // The any-format path resamples it instead.
    let spec = extract::mel_of_file(Path::new("ffmpeg"), &other_rate).unwrap();
    assert_eq!(spec.frames, 50);
}
