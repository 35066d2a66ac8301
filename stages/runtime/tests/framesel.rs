//! Frame selection of the 25 fps decoder against the reference's own recipe: clips at 24,
//! 29.97, 30, 50 and 60 fps whose pixels carry the source frame number are re-encoded with
//! `ffmpeg -i src -r 25 -crf 18 ref.mp4` exactly as LatentSync does; the frame numbers read
//! back from that file must equal those from our `FrameReader` on the source, and both
//! must equal the prediction of `framesel::predict`.

use std::path::Path;
use std::process::Command;

use lipsync_runtime::media::{FrameReader, framesel};

const W: usize = 320;
const H: usize = 32;
const BITS: usize = 10;

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A clip of `secs` seconds at `rate` whose luma spells the frame number in 32 px columns.
fn index_clip(path: &Path, rate: &str, secs: u32) {
    let src = format!(
        "color=gray:s={W}x{H}:r={rate}:d={secs},format=yuv420p,\
         geq=lum='if(mod(floor(N/pow(2\\,floor(X/32)))\\,2)\\,235\\,16)':cb=128:cr=128"
    );
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libx264",
        "-crf",
        "0",
        "-g",
        "12",
        "-bf",
        "2",
        path.to_str().unwrap(),
    ]);
}

/// Frame number spelled by one frame (`stride` bytes per pixel, first channel read).
fn number(frame: &[u8], stride: usize) -> usize {
    (0..BITS)
        .filter(|b| frame[((H / 2) * W + b * 32 + 16) * stride] > 125)
        .map(|b| 1 << b)
        .sum()
}

/// What the reference sees: the `-r 25 -crf 18` re-encode, read frame by frame.
fn reference(src: &Path, dir: &Path) -> Vec<usize> {
    let re = dir.join("ref.mp4");
    ffmpeg(&[
        "-i",
        src.to_str().unwrap(),
        "-r",
        "25",
        "-crf",
        "18",
        re.to_str().unwrap(),
    ]);
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(&re)
        .args([
            "-fps_mode",
            "passthrough",
            "-pix_fmt",
            "gray",
            "-f",
            "rawvideo",
            "-",
        ])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success());
    out.stdout
        .chunks_exact(W * H)
        .map(|f| number(f, 1))
        .collect()
}

fn ours(src: &Path) -> Vec<usize> {
    let mut r = FrameReader::open(src).expect("opens");
    let mut buf = Vec::new();
    let mut v = Vec::new();
    while r.read_into(&mut buf).expect("decodes") {
        v.push(number(&buf, 3));
    }
    v
}

#[test]
fn frame_selection_matches_the_reference_re_encode() {
    let dir = tempfile::tempdir().unwrap();
    for rate in ["24", "30000/1001", "30", "50", "60", "25"] {
        let src = dir
            .path()
            .join(format!("src-{}.mp4", rate.replace('/', "_")));
        index_clip(&src, rate, 4);
        let want = reference(&src, dir.path());
        let got = ours(&src);
        assert_eq!(got, want, "{rate} fps: decoder vs reference re-encode");
        let predicted = framesel::predict(&src).unwrap();
        assert_eq!(predicted, want, "{rate} fps: model vs reference re-encode");
        assert!(want.len() >= 100, "{rate} fps: {} frames", want.len());
    }
}

#[test]
fn the_fps_filter_would_pick_other_frames() {
    // Guards the test itself: the old `-vf fps=25` recipe differs from the reference, so
    // the comparison above can fail.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.mp4");
    index_clip(&src, "30", 2);
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(&src)
        .args(["-vf", "fps=25", "-pix_fmt", "gray", "-f", "rawvideo", "-"])
        .output()
        .unwrap();
    let filtered: Vec<usize> = out
        .stdout
        .chunks_exact(W * H)
        .map(|f| number(f, 1))
        .collect();
    assert_ne!(filtered, reference(&src, dir.path()));
}
