//! Ping-pong reads: backward laps re-decoded into an in-memory window give exactly the
//! forward frames, last to first, whatever the window size, with the decode count of the
//! documented cost model.

use std::path::{Path, PathBuf};
use std::process::Command;

use lipsync_mux::source::VideoFrames;
use lipsync_runtime::media::{DecodeOptions, FrameReader, Geometry, LengthMode, source_frame};

const W: u32 = 98;
const H: u32 = 62;

/// A 1 s testsrc2 clip at `rate` (every frame differs).
fn clip(dir: &Path, name: &str, rate: &str) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size={W}x{H}:rate={rate}"))
        .args(["-t", "1", "-c:v", "libx264", "-preset", "ultrafast"])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

/// The forward pass: every frame the shared decoder selects, in order.
fn decode_all(path: &Path) -> Vec<Vec<u8>> {
    let mut r = FrameReader::open(path).unwrap();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.read_into(&mut buf).unwrap() {
        out.push(buf.clone());
    }
    out
}

/// Reads forward, backward, and 10 frames forward again with windows of `k` frames.
fn check(video: &Path, frames: &[Vec<u8>], k: usize) {
    let n = frames.len();
    let fb = (W * H * 3) as usize;
    let mut v = VideoFrames::open(
        video,
        n,
        Geometry {
            width: W,
            height: H,
        },
        (k * fb + fb / 2) as u64, // not a whole number of frames: rounded down
        DecodeOptions::default(),
    );
    assert_eq!(v.window_frames(), k);
    let output = 2 * n + 10;
    let mut buf = Vec::new();
    for out in 0..output {
        let src = source_frame(out, n, LengthMode::Pingpong);
        v.read(src, &mut buf).unwrap();
        assert!(
            buf == frames[src],
            "window {k}: output frame {out} (video frame {src}) differs"
        );
    }
    // One forward decode, ceil(n / k) backward windows (ending at n, n - k, ...; the last
    // one, [0, r), holds the remainder), and a fresh forward decode for the third lap
    // unless its 10 frames are all still in that last window.
    let windows = n.div_ceil(k);
    let last = n - (windows - 1) * k;
    let expected = 1 + windows + usize::from(last < 10);
    assert_eq!(v.decodes, expected, "window {k}, {n} frames");
    assert!(v.window_bytes() <= (k.min(n) * fb) as u64);
}

fn pingpong_is_exact(rate: &str, expected_frames: std::ops::RangeInclusive<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), "clip.mp4", rate);
    let frames = decode_all(&video);
    let n = frames.len();
    assert!(expected_frames.contains(&n), "{n} frames at 25 fps");
    assert!(
        frames.windows(2).all(|p| p[0] != p[1]),
        "consecutive frames must differ for the check to mean anything"
    );
    // 1 frame; two sizes that do not divide n; the whole video and more in one window.
    let not_dividing = |c: &[usize]| *c.iter().find(|&&k| !n.is_multiple_of(k)).unwrap();
    for k in [1, not_dividing(&[7, 9, 11]), not_dividing(&[13, 17]), n + 3] {
        check(&video, &frames, k);
    }
}

#[test]
fn backward_laps_are_the_forward_frames_reversed_at_25_fps() {
    pingpong_is_exact("25", 25..=25);
}

#[test]
fn backward_laps_are_the_forward_frames_reversed_at_29_97_fps() {
    // 29.97 -> 25 fps drops source frames: the selection must be the same on every decode.
    pingpong_is_exact("30000/1001", 23..=28);
}
