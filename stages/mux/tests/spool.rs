//! The ping-pong spool: frames read back through the lossless compressed segments are
//! bit-exact, the scratch it uses is bounded by `max_scratch_bytes`, and it leaves nothing
//! behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use lipsync_mux::MuxError;
use lipsync_mux::source::{SpoolLimits, VideoFrames, segment_frames};
use lipsync_runtime::media::{DecodeOptions, FrameReader, LengthMode, source_frame};

fn clip(dir: &Path, w: u32, h: u32, secs: u32) -> PathBuf {
    let out = dir.join("clip.mp4");
    let st = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size={w}x{h}:rate=25"))
        .args([
            "-t",
            &secs.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

fn decode_all(path: &Path) -> Vec<Vec<u8>> {
    let mut r = FrameReader::open(path).unwrap();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.read_into(&mut buf).unwrap() {
        out.push(buf.clone());
    }
    out
}

#[test]
fn pingpong_frames_through_the_spool_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    // Not a multiple of 16 (x264's macroblocks): the spool must keep every pixel.
    let (w, h) = (162u32, 118u32);
    let video = clip(dir.path(), w, h, 2);
    let frames = decode_all(&video);
    let n = frames.len();
    assert_eq!(n, 50);
    let fb = (w * h * 3) as u64;
    let limits = SpoolLimits {
        window_bytes: 7 * fb, // 7-frame segments: many segments, windows reloaded
        max_scratch_bytes: 1 << 30,
    };
    assert_eq!(segment_frames(fb as usize, limits.window_bytes), 7);
    let output = 2 * n + 30; // forward, backward, forward again (from the spool)
    let geometry = lipsync_runtime::media::Geometry {
        width: w,
        height: h,
    };
    let mut v = VideoFrames::open(
        &video,
        n,
        geometry,
        output,
        LengthMode::Pingpong,
        &scratch,
        limits,
        DecodeOptions::default(),
    )
    .unwrap();
    let mut buf = Vec::new();
    for k in 0..output {
        let src = source_frame(k, n, LengthMode::Pingpong);
        v.read(src, &mut buf).unwrap();
        assert!(
            buf == frames[src],
            "output frame {k} (video frame {src}) differs"
        );
    }
    assert_eq!(
        v.decodes, 1,
        "the backward lap and the third lap come from the spool"
    );
    let peak = v.scratch_peak();
    let raw = n as u64 * fb;
    assert!(
        peak > 0 && peak < raw,
        "scratch peak {peak} vs raw spool {raw}"
    );
    eprintln!("scratch peak {peak} bytes for {n} frames ({raw} bytes raw)");
    drop(v);
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the spool left files behind"
    );
}

#[test]
fn a_spool_over_the_scratch_cap_is_input_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (160u32, 120u32);
    let video = clip(dir.path(), w, h, 2);
    let fb = u64::from(w * h * 3);
    let mut v = VideoFrames::open(
        &video,
        50,
        lipsync_runtime::media::Geometry {
            width: w,
            height: h,
        },
        100,
        LengthMode::Pingpong,
        dir.path(),
        SpoolLimits {
            window_bytes: 5 * fb,
            max_scratch_bytes: 2 * fb,
        },
        DecodeOptions::default(),
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut err = None;
    for k in 0..100 {
        if let Err(e) = v.read(source_frame(k, 50, LengthMode::Pingpong), &mut buf) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the cap stops the render");
    assert!(matches!(e, MuxError::TooLong(_)), "{e}");
}
