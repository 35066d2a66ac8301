//! `--preview`: decodes the video again (same 25 fps recipe), draws each frame's box
//! (green: detected, yellow: bridged), landmarks (red) and the crop box the affine
//! selects (blue), and encodes H.264 with ffmpeg. Streams frame by frame.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use lipsync_runtime::media::{FPS, FrameReader, MediaCommand};
use lipsync_schemas::{FaceFrame, FaceTrack};

use crate::error::{FaceError, Result};
use crate::geometry::{apply, invert};

const GREEN: [u8; 3] = [0, 220, 0];
const YELLOW: [u8; 3] = [240, 220, 0];
const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [40, 120, 255];

/// Writes the preview video of `track` over `video` to `out`.
///
/// # Errors
/// [`FaceError::Media`] when decoding fails, [`FaceError::Io`] when ffmpeg fails.
pub fn write_preview(video: &Path, track: &FaceTrack, out: &Path) -> Result<()> {
    let mut reader = FrameReader::open(video).map_err(|e| FaceError::Media(e.to_string()))?;
    let (w, h) = (reader.geometry.width, reader.geometry.height);
    let size = format!("{w}x{h}");
    let rate = FPS.to_string();
    let mut enc = MediaCommand::ffmpeg()
        .arg("-y")
        .pipe_input([
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &size, "-r", &rate,
        ])
        .args(["-c:v", "libx264", "-preset", "veryfast", "-crf", "23"])
        .args([
            "-pix_fmt",
            "yuv420p",
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
        ])
        .output(out)
        .spawn_with(|c| {
            c.stdin(Stdio::piped()).stdout(Stdio::null());
        })
        .map_err(|e| FaceError::Media(e.to_string()))?;
    let mut stdin = enc.child.stdin.take().expect("piped stdin");
    let mut frame = Vec::new();
    let mut index = 0usize;
    while reader
        .read_into(&mut frame)
        .map_err(|e| FaceError::Media(e.to_string()))?
    {
        if let Some(f) = track.frames.get(index) {
            draw(&mut frame, w as usize, h as usize, f, track);
        }
        stdin.write_all(&frame)?;
        index += 1;
    }
    drop(stdin);
    let status = enc.child.wait()?;
    if !status.success() {
        let err = enc.take_stderr();
        return Err(FaceError::Io(std::io::Error::other(format!(
            "ffmpeg preview encoder exited with {status}: {}",
            enc.reason(&err)
        ))));
    }
    Ok(())
}

fn draw(img: &mut [u8], w: usize, h: usize, f: &FaceFrame, track: &FaceTrack) {
    if !f.present {
        return;
    }
    let mut put = |x: f64, y: f64, c: [u8; 3]| {
        if x >= 0.0 && y >= 0.0 && (x as usize) < w && (y as usize) < h {
            let i = (y as usize * w + x as usize) * 3;
            img[i..i + 3].copy_from_slice(&c);
        }
    };
    let line = |a: [f64; 2], b: [f64; 2], c: [u8; 3], put: &mut dyn FnMut(f64, f64, [u8; 3])| {
        let steps = ((b[0] - a[0]).abs().max((b[1] - a[1]).abs()).ceil() as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            put(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, c);
        }
    };
    let b = f.bbox.map(f64::from);
    let colour = if f.interpolated { YELLOW } else { GREEN };
    let corners = [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]];
    for k in 0..4 {
        line(corners[k], corners[(k + 1) % 4], colour, &mut put);
    }
    let m = f.affine.map(|r| r.map(f64::from));
    if let Some(inv) = invert(&m) {
        let (cw, ch) = (f64::from(track.crop_w), f64::from(track.crop_h));
        let crop = [[0.0, 0.0], [cw, 0.0], [cw, ch], [0.0, ch]].map(|p| apply(&inv, p));
        for k in 0..4 {
            line(crop[k], crop[(k + 1) % 4], BLUE, &mut put);
        }
    }
    for p in &f.landmarks {
        for dy in -2..=2 {
            for dx in -2..=2 {
                put(
                    f64::from(p[0]) + f64::from(dx),
                    f64::from(p[1]) + f64::from(dy),
                    RED,
                );
            }
        }
    }
}
