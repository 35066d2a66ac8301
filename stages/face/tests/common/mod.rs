//! Shared helpers of the face tests: the test portrait, clips made from it with ffmpeg,
//! and the detector with the default settings.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

use lipsync_face::align::Geometry;
use lipsync_face::{FaceSettings, Geometries};
use lipsync_runtime::config::{FaceConfig, ModelsConfig};

/// Workspace root.
pub fn root() -> PathBuf {
    lipsync_tests::workspace_root()
}

/// The test portrait (512x512), fetched by `make setup`.
pub fn astronaut() -> PathBuf {
    let p = root().join("tests/assets/generated/astronaut.png");
    assert!(
        p.is_file(),
        "{} is missing: run `make setup` (scripts/setup.d/20-face-assets.sh)",
        p.display()
    );
    p
}

pub use lipsync_tests::pipeline::ffmpeg;

/// The portrait decoded to RGB24.
pub struct Portrait {
    /// Width.
    pub w: usize,
    /// Height.
    pub h: usize,
    /// Pixels.
    pub rgb: Vec<u8>,
}

/// Decodes the portrait with ffmpeg.
pub fn portrait() -> Portrait {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(astronaut())
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 512 * 512 * 3);
    Portrait {
        w: 512,
        h: 512,
        rgb: out.stdout,
    }
}

/// Placement of the portrait in a frame: `P' = s R(angle) P + t` in continuous
/// coordinates (pixel `i` covers `[i, i + 1)`); `angle` turns clockwise on screen.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    /// Scale.
    pub s: f64,
    /// Rotation in radians.
    pub angle: f64,
    /// Translation x.
    pub tx: f64,
    /// Translation y.
    pub ty: f64,
}

impl Place {
    /// A scale and an offset.
    pub fn at(s: f64, tx: f64, ty: f64) -> Self {
        Self {
            s,
            angle: 0.0,
            tx,
            ty,
        }
    }

    /// Where a portrait point given in pixel-index coordinates lands in the frame.
    pub fn map(&self, p: [f64; 2]) -> [f64; 2] {
        let (sin, cos) = self.angle.sin_cos();
        let (x, y) = (p[0] + 0.5, p[1] + 0.5);
        [
            self.s * (cos * x - sin * y) + self.tx - 0.5,
            self.s * (sin * x + cos * y) + self.ty - 0.5,
        ]
    }

    fn unmap(&self, x: f64, y: f64) -> [f64; 2] {
        let (sin, cos) = self.angle.sin_cos();
        let (dx, dy) = ((x - self.tx) / self.s, (y - self.ty) / self.s);
        [cos * dx + sin * dy, -sin * dx + cos * dy]
    }
}

/// Renders a `w` x `h` clip at 25 fps where frame `i` shows the portrait placed by
/// `place(i)` (bilinear) on grey, or only grey for `None`; encodes it near-losslessly.
/// The ground truth of every clip is therefore exact.
pub fn render(
    dir: &Path,
    name: &str,
    w: usize,
    h: usize,
    frames: usize,
    place: impl Fn(usize) -> Option<Place>,
) -> PathBuf {
    use std::io::Write;
    let src = portrait();
    let out = dir.join(name);
    let mut enc = Command::new("ffmpeg")
        .args([
            "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
        ])
        .args(["-s", &format!("{w}x{h}"), "-r", "25", "-i", "pipe:0"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-qp",
            "0",
            "-pix_fmt",
            "yuv444p",
        ])
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ffmpeg runs");
    let mut stdin = enc.stdin.take().unwrap();
    let mut frame = vec![128u8; w * h * 3];
    for i in 0..frames {
        frame.fill(128);
        if let Some(pl) = place(i) {
            for y in 0..h {
                for x in 0..w {
                    let q = pl.unmap(x as f64 + 0.5, y as f64 + 0.5);
                    let (sx, sy) = (q[0] - 0.5, q[1] - 0.5);
                    if sx < 0.0 || sy < 0.0 || sx > (src.w - 1) as f64 || sy > (src.h - 1) as f64 {
                        continue;
                    }
                    let (x0, y0) = (sx as usize, sy as usize);
                    let (x1, y1) = ((x0 + 1).min(src.w - 1), (y0 + 1).min(src.h - 1));
                    let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
                    for c in 0..3 {
                        let at =
                            |xx: usize, yy: usize| f64::from(src.rgb[(yy * src.w + xx) * 3 + c]);
                        let v = (at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx) * (1.0 - fy)
                            + (at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx) * fy;
                        frame[(y * w + x) * 3 + c] = v.round() as u8;
                    }
                }
            }
        }
        stdin.write_all(&frame).unwrap();
    }
    drop(stdin);
    assert!(enc.wait().unwrap().success(), "encoding {name}");
    out
}

/// A clip without any face (ffmpeg's test pattern).
pub fn no_face_clip(dir: &Path, frames: u32) -> PathBuf {
    let out = dir.join("noface.mp4");
    let src = format!(
        "testsrc=size=640x360:rate=25:duration={:.2}",
        f64::from(frames) / 25.0
    );
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        out.to_str().unwrap(),
    ]);
    out
}

/// Face settings: the defaults with `tweak` applied, the set-up's model folder.
pub fn settings(tweak: impl FnOnce(&mut FaceConfig)) -> FaceSettings {
    let mut cfg = FaceConfig {
        models_dir: root().join("models/generated/face"),
        ..FaceConfig::default()
    };
    tweak(&mut cfg);
    FaceSettings::from_config(&cfg).expect("valid face settings")
}

/// The crop geometry of a profile from the shipped manifest.
pub fn geometry(profile: &str) -> Geometry {
    let models = ModelsConfig {
        profile: "tiny".into(),
        manifest: root().join("models/manifest.toml"),
    };
    Geometries::load(&models)
        .expect("manifest")
        .for_model(profile)
}

/// Distance between two points.
pub fn dist(a: [f64; 2], b: [f32; 2]) -> f64 {
    ((a[0] - f64::from(b[0])).powi(2) + (a[1] - f64::from(b[1])).powi(2)).sqrt()
}
