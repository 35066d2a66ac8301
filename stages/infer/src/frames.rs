//! The crop store: every video frame a job needs, warped into the face crop box and
//! resized to `R x R`, written once to a scratch file (`R*R*3` bytes per frame, indexed by
//! video frame) by a producer thread while the model works. Output frames that repeat
//! video frames (ping-pong or loop) read them back by index, so memory stays flat in video
//! length and the video is decoded exactly once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use lipsync_runtime::media::{DecodeOptions, FrameReader};
use lipsync_schemas::FaceTrack;

use crate::error::{InferError, Result};
use crate::image::{invert_affine, resize_lanczos, warp_affine};

/// Geometry of the crops.
#[derive(Debug, Clone, Copy)]
pub struct CropGeometry {
    /// Crop box width (frame pixels warped into it).
    pub crop_w: usize,
    /// Crop box height.
    pub crop_h: usize,
    /// Model resolution `R`.
    pub resolution: usize,
    /// Fill value outside the frame.
    pub fill: u8,
}

impl CropGeometry {
    /// Bytes of one `R x R` RGB24 crop.
    pub fn frame_bytes(&self) -> usize {
        self.resolution * self.resolution * 3
    }
}

#[derive(Default)]
struct State {
    written: usize,
    failed: Option<String>,
    finished: bool,
}

/// Scratch-file store of warped crops, filled by [`CropStore::produce`].
pub struct CropStore {
    file: File,
    geometry: CropGeometry,
    state: Mutex<State>,
    ready: Condvar,
    abort: AtomicBool,
}

impl CropStore {
    /// Creates an empty store backed by an anonymous file in `dir`.
    ///
    /// # Errors
    /// The scratch file cannot be created.
    pub fn new(dir: &Path, geometry: CropGeometry) -> Result<Self> {
        Ok(Self {
            file: tempfile::tempfile_in(dir)?,
            geometry,
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            abort: AtomicBool::new(false),
        })
    }

    /// Stops the producer and wakes every waiter.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        let _guard = self.state.lock().expect("crop store lock");
        self.ready.notify_all();
    }

    /// Decodes `video` with the shared 25 fps recipe and stores the crops of frames
    /// `0..needed`. Runs on its own thread; failures are reported to the readers too.
    ///
    /// # Errors
    /// Decoding or writing failed, or the video has fewer frames than needed.
    pub fn produce(
        &self,
        video: &Path,
        decode: &DecodeOptions,
        track: &FaceTrack,
        needed: usize,
    ) -> Result<()> {
        let res = self.produce_inner(video, decode, track, needed);
        let mut st = self.state.lock().expect("crop store lock");
        st.finished = true;
        if let Err(e) = &res {
            st.failed = Some(e.to_string());
        }
        self.ready.notify_all();
        res
    }

    fn produce_inner(
        &self,
        video: &Path,
        decode: &DecodeOptions,
        track: &FaceTrack,
        needed: usize,
    ) -> Result<()> {
        let g = self.geometry;
        let mut reader =
            FrameReader::open_with(video, decode).map_err(|e| InferError::Input(e.to_string()))?;
        let (w, h) = (
            reader.geometry.width as usize,
            reader.geometry.height as usize,
        );
        if (w, h) != (track.width as usize, track.height as usize) {
            return Err(InferError::Input(format!(
                "video frames are {w}x{h} but the face track was made for {}x{}",
                track.width, track.height
            )));
        }
        let mut frame = Vec::new();
        let mut warped = Vec::new();
        let grey = vec![g.fill; g.frame_bytes()];
        for idx in 0..needed {
            if self.abort.load(Ordering::SeqCst) {
                return Err(InferError::Stopped);
            }
            if !reader
                .read_into(&mut frame)
                .map_err(|e| InferError::Input(e.to_string()))?
            {
                return Err(InferError::Input(format!(
                    "video ended after {idx} frames; the face track has {}",
                    track.frame_count
                )));
            }
            let inv = track.frames.get(idx).and_then(|f| invert_affine(&f.affine));
            let crop = match inv {
                Some(inv) => {
                    warp_affine(
                        &frame,
                        w,
                        h,
                        &inv,
                        (g.crop_w, g.crop_h),
                        g.fill,
                        &mut warped,
                    );
                    resize_lanczos(&warped, g.crop_w, g.crop_h, 3, g.resolution, g.resolution)
                }
                None => grey.clone(),
            };
            self.file
                .write_all_at(&crop, (idx * g.frame_bytes()) as u64)?;
            let mut st = self.state.lock().expect("crop store lock");
            st.written = idx + 1;
            self.ready.notify_all();
        }
        Ok(())
    }

    /// Reads the crop of video frame `idx` into `buf`, waiting for the producer.
    ///
    /// # Errors
    /// The producer failed or stopped before writing it.
    pub fn read(&self, idx: usize, buf: &mut [u8]) -> Result<()> {
        {
            let mut st = self.state.lock().expect("crop store lock");
            while st.written <= idx {
                if let Some(f) = &st.failed {
                    return Err(InferError::Input(f.clone()));
                }
                if st.finished || self.abort.load(Ordering::SeqCst) {
                    return Err(InferError::Stopped);
                }
                st = self.ready.wait(st).expect("crop store lock");
            }
        }
        self.file
            .read_exact_at(buf, (idx * self.geometry.frame_bytes()) as u64)?;
        Ok(())
    }
}
