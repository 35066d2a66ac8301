//! The Whisper encoder windows through ONNX Runtime on the tiny profile: the reference
//! layout (30 s windows, first floor(frames/2) positions, (T, 5, 384)), the cross-faded
//! overlap, and the `features` command.
//!
//! About seam continuity on the tiny model: its encoder is local in time (a stride-2
//! convolution, a random positional embedding and per-position MLP blocks), so every step
//! between neighbouring positions already jumps by a random positional difference as
//! large as the one at a 30 s boundary: "smaller jump at the seam" cannot be told apart
//! from noise there. The seam property is tested in `windows::tests::
//! overlap_removes_the_seam_jump` with an encoder whose output drifts with the position
//! in the window (what makes Whisper's features jump at boundaries); here the tiny model
//! checks that the real ONNX path assembles windows and cross-fades exactly as planned,
//! and the seam statistics are printed for information.

use std::path::PathBuf;
use std::process::Command;

use lipsync_audio::encoder::{EncoderOptions, OrtEncoder};
use lipsync_audio::mel::{LogMelSpectrogram, MelCollector, SAMPLE_RATE};
use lipsync_audio::windows::{
    DIM, LAYERS, POSITION_VALUES, WINDOW_FRAMES, WINDOW_POSITIONS, WindowEncoder, encode_all,
    to_rows,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn encoder() -> OrtEncoder {
    let cfg = lipsync_runtime::config::ModelsConfig {
        profile: "tiny".into(),
        manifest: root().join("models/manifest.toml"),
    };
    let profile = lipsync_runtime::models::resolve(&cfg, &["whisper_encoder"])
        .expect("tiny profile (run `make setup`)");
    let path = profile.model_path("whisper_encoder").unwrap();
    OrtEncoder::load(&path, &EncoderOptions::default())
        .expect("ORT_DYLIB_PATH set (`. .local/env.sh`)")
}

/// `seconds` of a speech-like signal: harmonics of a wandering pitch, amplitude-modulated
/// at syllable rate.
fn mel_of_signal(seconds: f64) -> LogMelSpectrogram {
    let n = (seconds * f64::from(SAMPLE_RATE)) as usize;
    let sr = f64::from(SAMPLE_RATE);
    let mut phase = 0.0f64;
    let samples: Vec<f32> = (0..n)
        .map(|i| {
            let t = i as f64 / sr;
            let f0 = 140.0 + 40.0 * (t * 0.7).sin();
            phase += 2.0 * std::f64::consts::PI * f0 / sr;
            let env = 0.5 + 0.5 * (2.0 * std::f64::consts::PI * 4.0 * t).sin();
            let v: f64 = (1..6).map(|h| (phase * h as f64).sin() / h as f64).sum();
            (0.3 * env * v) as f32
        })
        .collect();
    let mut c = MelCollector::new();
    c.push(&samples);
    c.finish().unwrap()
}

fn run(enc: &mut OrtEncoder, mel: &LogMelSpectrogram, overlap: usize) -> Vec<f32> {
    let mut out = Vec::new();
    let t = encode_all(
        mel,
        overlap,
        enc,
        |_, _| Ok(()),
        |rows| {
            out.extend_from_slice(rows);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(t, mel.frames / 2);
    assert_eq!(out.len(), t * POSITION_VALUES);
    out
}

fn window_rows(
    enc: &mut OrtEncoder,
    mel: &LogMelSpectrogram,
    start: usize,
    keep: usize,
) -> Vec<f32> {
    let input = mel.window(start, WINDOW_FRAMES, WINDOW_FRAMES);
    to_rows(&enc.encode(&input).unwrap(), keep)
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(err <= tol, "max abs difference {err}");
}

/// L2 distance between the rows of consecutive positions.
fn steps(rows: &[f32]) -> Vec<f32> {
    rows.chunks(POSITION_VALUES)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| {
            w[0].iter()
                .zip(w[1])
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt()
        })
        .collect()
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
fn reference_windows_give_whisper_layout() {
    let mut enc = encoder();
    let mel = mel_of_signal(65.0); // 6500 frames: windows of 3000, 3000 and 500
    let rows = run(&mut enc, &mel, 0);
    assert_eq!(rows.len() / POSITION_VALUES, 3250);
    let w0 = window_rows(&mut enc, &mel, 0, WINDOW_POSITIONS);
    close(&rows[..WINDOW_POSITIONS * POSITION_VALUES], &w0, 1e-6);
    let w2 = window_rows(&mut enc, &mel, 6000, 250);
    close(&rows[3000 * POSITION_VALUES..], &w2, 1e-6);
    // (T, 5, 384): the 5 hidden states of a position differ (embedding vs blocks).
    let first = &rows[..POSITION_VALUES];
    assert_ne!(first[..DIM], first[(LAYERS - 1) * DIM..]);
}

#[test]
fn overlap_crossfades_at_the_seams() {
    let mut enc = encoder();
    let mel = mel_of_signal(65.0);
    let ov = 100; // 2 s
    let stride = WINDOW_POSITIONS - ov;
    let plain = run(&mut enc, &mel, 0);
    let faded = run(&mut enc, &mel, ov);
    let a = window_rows(&mut enc, &mel, 0, WINDOW_POSITIONS);
    let b = window_rows(&mut enc, &mel, 2 * stride, WINDOW_POSITIONS);
    // Before the shared part: window 0 alone.
    close(
        &faded[..stride * POSITION_VALUES],
        &a[..stride * POSITION_VALUES],
        1e-6,
    );
    // Shared part: a linear cross-fade from window 0 to window 1.
    for i in [0usize, 37, 99] {
        let w = (i as f32 + 0.5) / ov as f32;
        let t = stride + i;
        let want: Vec<f32> = a[t * POSITION_VALUES..][..POSITION_VALUES]
            .iter()
            .zip(&b[i * POSITION_VALUES..][..POSITION_VALUES])
            .map(|(x, y)| (1.0 - w) * x + w * y)
            .collect();
        close(
            &faded[t * POSITION_VALUES..][..POSITION_VALUES],
            &want,
            1e-5,
        );
    }
    // Right after the shared part: window 1 alone.
    let t = WINDOW_POSITIONS;
    close(
        &faded[t * POSITION_VALUES..][..POSITION_VALUES],
        &b[(t - stride) * POSITION_VALUES..][..POSITION_VALUES],
        1e-6,
    );
    // Seam statistics (deterministic: fixed model, fixed input). Even the local tiny
    // model shows a seam: the first position of a window sees zero padding where the
    // previous frame was. The cross-fade spreads that over the shared part.
    let (sp, sf) = (steps(&plain), steps(&faded));
    let med = median(sp.clone());
    let seam = sp[WINDOW_POSITIONS - 1] / med;
    let interior = sp[10..WINDOW_POSITIONS - 10]
        .iter()
        .cloned()
        .fold(0.0, f32::max)
        / med;
    let in_fade = sf[stride - 1..WINDOW_POSITIONS]
        .iter()
        .cloned()
        .fold(0.0, f32::max)
        / med;
    eprintln!(
        "tiny model, steps / median step: largest inside a window {interior:.2}, at the 30 s seam {seam:.2}; largest in the 2 s cross-fade {in_fade:.2}"
    );
    assert!(in_fade < seam, "cross-fade {in_fade} vs seam {seam}");
}

#[test]
fn features_command_writes_the_array() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("features.npy");
    let speech = root().join("tests/assets/generated/speech_16k.wav");
    assert!(speech.exists(), "run `make setup`");
    let st = Command::new(env!("CARGO_BIN_EXE_lipsync-audio"))
        .current_dir(root())
        .args(["--set", "models.profile=tiny", "features"])
        .arg(&speech)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let arr: ndarray::Array3<f32> = ndarray_npy::read_npy(&out).unwrap();
    let samples = hound::WavReader::open(&speech).unwrap().len() as usize;
    assert_eq!(arr.dim(), (samples / 160 / 2, LAYERS, DIM));
}
