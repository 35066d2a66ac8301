//! Inputs of the mux stage built by hand: an ffmpeg test clip, a face track with a known
//! affine, solid-colour crops and the WAVs, stored under a task's keys on a real
//! nats-server.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lipsync_runtime::media::FrameReader;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::{FaceFrame, FaceTrack, MuxJob, Status, TaskRecord, names};
use lipsync_tests::{NatsServer, new_record, topology, wait_for};

/// Crop box and model size of the test track.
pub const CROP_W: u32 = 42;
pub const CROP_H: u32 = 56;
pub const RES: u32 = 32;
/// The crop box is shown 2x larger in the frame, with its corner here.
pub const SCALE: f32 = 2.0;
/// Colour of the generated crops.
pub const CROP_RGB: [u8; 3] = [220, 30, 30];

pub use lipsync_tests::pipeline::ffmpeg;

/// A `w x h` 25 fps test clip of `secs` seconds with a 440 Hz tone.
pub fn clip(dir: &Path, name: &str, w: u32, h: u32, secs: f64) -> PathBuf {
    let p = dir.join(name);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        // testsrc2 rounds sizes to even: scale to the exact size afterwards.
        &format!(
            "testsrc2=size={}x{}:rate=25:duration={secs},scale={w}:{h}",
            w + w % 2,
            h + h % 2
        ),
        "-f",
        "lavfi",
        "-i",
        &format!("sine=frequency=440:duration={secs}"),
        "-c:v",
        "libx264",
        "-crf",
        "12",
        "-pix_fmt",
        // 4:2:0 needs even sizes; odd test sizes use 4:4:4.
        if w.is_multiple_of(2) && h.is_multiple_of(2) {
            "yuv420p"
        } else {
            "yuv444p"
        },
        "-c:a",
        "aac",
        "-shortest",
        p.to_str().unwrap(),
    ]);
    p
}

/// A WAV tone of `secs` seconds at `rate` Hz with `channels`.
pub fn wav(dir: &Path, name: &str, secs: f64, rate: u32, channels: u32) -> PathBuf {
    let p = dir.join(name);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &format!("sine=frequency=300:duration={secs}:sample_rate={rate}"),
        "-ac",
        &channels.to_string(),
        p.to_str().unwrap(),
    ]);
    p
}

/// `frames` solid crops of the test colour, R x R, lossless.
pub fn crops(dir: &Path, frames: usize) -> PathBuf {
    let p = dir.join("crops.mkv");
    let [r, g, b] = CROP_RGB;
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &format!("color=c=0x{r:02x}{g:02x}{b:02x}:s={RES}x{RES}:r=25"),
        "-frames:v",
        &frames.to_string(),
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "bgr0",
        p.to_str().unwrap(),
    ]);
    p
}

/// The corner of the crop box in the frame for a `w x h` video: centred.
pub fn box_origin(w: u32, h: u32) -> (f32, f32) {
    (
        (w as f32 - CROP_W as f32 * SCALE) / 2.0,
        (h as f32 - CROP_H as f32 * SCALE) / 2.0,
    )
}

/// A track whose face is the centred, 2x crop box, absent where `absent(i)`.
pub fn track(w: u32, h: u32, n: usize, absent: impl Fn(usize) -> bool) -> FaceTrack {
    let (tx, ty) = box_origin(w, h);
    let frames = (0..n)
        .map(|i| {
            let present = !absent(i);
            FaceFrame {
                present,
                score: if present { 0.9 } else { 0.0 },
                bbox: [
                    tx,
                    ty,
                    tx + CROP_W as f32 * SCALE,
                    ty + CROP_H as f32 * SCALE,
                ],
                landmarks: Vec::new(),
                affine: if present {
                    [
                        [1.0 / SCALE, 0.0, -tx / SCALE],
                        [0.0, 1.0 / SCALE, -ty / SCALE],
                    ]
                } else {
                    [[0.0; 3]; 2]
                },
                interpolated: false,
            }
        })
        .collect();
    FaceTrack {
        v: 1,
        fps: 25.0,
        width: w,
        height: h,
        frame_count: n as u64,
        crop_w: CROP_W,
        crop_h: CROP_H,
        resolution: RES,
        detector: "test".into(),
        frames,
    }
}

/// Every decoded frame of a file (small clips only).
pub fn frames(path: &Path) -> (usize, usize, Vec<Vec<u8>>) {
    let mut r = FrameReader::open(path).unwrap();
    let (w, h) = (r.geometry.width as usize, r.geometry.height as usize);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.read_into(&mut buf).unwrap() {
        out.push(buf.clone());
    }
    (w, h, out)
}

/// Mean absolute difference over a rectangle (or its complement), all channels.
pub fn mad(a: &[u8], b: &[u8], w: usize, rect: (usize, usize, usize, usize), inside: bool) -> f64 {
    let (x0, y0, x1, y1) = rect;
    let (mut sum, mut n) = (0f64, 0usize);
    for (i, (pa, pb)) in a.chunks_exact(3).zip(b.chunks_exact(3)).enumerate() {
        let (x, y) = (i % w, i / w);
        let ins = x >= x0 && x < x1 && y >= y0 && y < y1;
        if ins == inside {
            for c in 0..3 {
                sum += (f64::from(pa[c]) - f64::from(pb[c])).abs();
            }
            n += 3;
        }
    }
    sum / n.max(1) as f64
}

/// Mean colour over a rectangle.
pub fn mean_rgb(a: &[u8], w: usize, rect: (usize, usize, usize, usize)) -> [f64; 3] {
    let (x0, y0, x1, y1) = rect;
    let mut s = [0f64; 3];
    for y in y0..y1 {
        for x in x0..x1 {
            for c in 0..3 {
                s[c] += f64::from(a[(y * w + x) * 3 + c]);
            }
        }
    }
    let n = ((x1 - x0) * (y1 - y0)) as f64;
    s.map(|v| v / n)
}

/// ffprobe JSON of a file's streams.
pub fn probe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

pub struct Env {
    pub nats: NatsServer,
    pub cfg: lipsync_runtime::Config,
    pub store: TaskStore,
    pub artifacts: NatsArtifacts,
    pub js: async_nats::jetstream::Context,
    pub outputs: tempfile::TempDir,
}

pub async fn env() -> Env {
    let nats = NatsServer::start().await.unwrap();
    let mut cfg = nats.config();
    cfg.mux.listen = "127.0.0.1:0".parse().unwrap();
    cfg.mux.preset = "veryfast".into();
    let outputs = tempfile::tempdir().unwrap();
    cfg.mux.local_dir = Some(outputs.path().to_path_buf());
    let topo = topology(&cfg).await.unwrap();
    Env {
        store: TaskStore::new(topo.tasks.clone()),
        artifacts: NatsArtifacts::new(topo.artifacts.clone()),
        js: topo.js.clone(),
        nats,
        cfg,
        outputs,
    }
}

/// The inputs of one task.
pub struct Task<'a> {
    pub video: &'a Path,
    pub track: &'a FaceTrack,
    pub crops: &'a Path,
    pub wav16k: &'a Path,
    pub original_audio: &'a Path,
    pub output_frames: usize,
    pub mode: &'a str,
}

impl Env {
    /// Stores the inputs under a new task's keys, creates its record and queues the job.
    pub async fn submit(&self, t: &Task<'_>) -> String {
        let tid = uuid::Uuid::new_v4().to_string();
        let key = |n: &str| names::artifact_key(&tid, n);
        let put = |k: String, p: PathBuf| {
            let a = self.artifacts.clone();
            async move { a.put_file(&k, &p).await.unwrap() }
        };
        put(key(names::artifact::VIDEO), t.video.to_path_buf()).await;
        put(key(names::artifact::CROPS), t.crops.to_path_buf()).await;
        put(key(names::artifact::AUDIO_16K), t.wav16k.to_path_buf()).await;
        put(
            key(names::artifact::AUDIO_ORIGINAL),
            t.original_audio.to_path_buf(),
        )
        .await;
        let json = serde_json::to_vec(t.track).unwrap();
        self.artifacts
            .put(&key(names::artifact::FACE_TRACK), &mut json.as_slice())
            .await
            .unwrap();
        self.artifacts
            .put(&key(names::artifact::AUDIO_FEATURES), &mut &b"features"[..])
            .await
            .unwrap();
        let mut rec = new_record(&tid);
        rec.status = Status::Processing;
        self.store.create(&rec).await.unwrap();
        lipsync_runtime::publish_work(
            &self.js,
            &MuxJob {
                v: lipsync_schemas::WORK_VERSION,
                task_id: tid.clone(),
                video: key(names::artifact::VIDEO),
                face_track: key(names::artifact::FACE_TRACK),
                crops: key(names::artifact::CROPS),
                audio_original: key(names::artifact::AUDIO_ORIGINAL),
                audio_16k: key(names::artifact::AUDIO_16K),
                output_frames: t.output_frames as u64,
                length_mode: serde_json::from_value(serde_json::Value::String(t.mode.into()))
                    .expect("length mode"),
                video_stream: None,
            },
        )
        .await
        .unwrap();
        tid
    }

    pub async fn wait(&self, tid: &str, pred: impl Fn(&TaskRecord) -> bool) -> TaskRecord {
        let pred = &pred;
        wait_for(Duration::from_secs(120), || {
            let store = self.store.clone();
            let tid = tid.to_owned();
            async move {
                let (r, _) = store.get(&tid).await.ok()??;
                pred(&r).then_some(r)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("task {tid}: {e}"))
    }

    pub async fn ended(&self, tid: &str) -> TaskRecord {
        self.wait(tid, |r| r.status.is_terminal()).await
    }

    /// Downloads an artifact into `dir`.
    pub async fn download(&self, tid: &str, name: &str, dir: &Path) -> PathBuf {
        let p = dir.join(format!("{tid}-{name}"));
        self.artifacts
            .get_to_file(&names::artifact_key(tid, name), &p)
            .await
            .unwrap();
        p
    }

    pub async fn exists(&self, tid: &str, name: &str) -> bool {
        self.artifacts
            .info(&names::artifact_key(tid, name))
            .await
            .unwrap()
            .is_some()
    }
}
