//! Stages decode the video stream fetch validated: with its index from the work item, a
//! file whose first video stream is another one (a cover or a second angle) still yields
//! the validated stream's frames, at the validated size.

use std::process::Command;

use lipsync_runtime::media::{DecodeOptions, FrameReader};
use lipsync_schemas::VideoStream;

fn frames(reader: &mut FrameReader) -> (usize, usize) {
    let (mut n, mut len) = (0, 0);
    let mut frame = Vec::new();
    while reader.read_into(&mut frame).unwrap() {
        n += 1;
        len = frame.len();
    }
    (n, len)
}

#[test]
fn the_validated_stream_is_decoded_not_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("two.mkv");
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120:rate=25:duration=1",
        ])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=2",
        ])
        .args([
            "-map", "0:v", "-map", "1:v", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        ])
        .arg(&clip)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without a validated stream: the first video stream.
    let mut first = FrameReader::open(&clip).unwrap();
    assert_eq!((first.geometry.width, first.geometry.height), (160, 120));
    assert_eq!(frames(&mut first), (25, 160 * 120 * 3));

    // The stream fetch validated (container index 1) at its size.
    let opts = DecodeOptions::validated(Some(VideoStream {
        index: 1,
        width: 320,
        height: 240,
    }));
    let mut second = FrameReader::open_with(&clip, &opts).unwrap();
    assert_eq!((second.geometry.width, second.geometry.height), (320, 240));
    assert_eq!(frames(&mut second), (50, 320 * 240 * 3));
}
