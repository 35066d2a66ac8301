//! Streaming tracking of one video file: a decoder thread reads 25 fps RGB frames with
//! the shared recipe (`lipsync_runtime::media::FrameReader`), prepares detector inputs
//! and sends batches through a bounded channel; the calling thread runs the detector
//! and builds the track. Memory: `queue_batches + 2` batches of prepared input, whatever
//! the video length.

use std::path::Path;
use std::sync::mpsc::{Receiver, sync_channel};

use lipsync_runtime::media::tool::settings;
use lipsync_runtime::media::{
    DecodeOptions, FPS, FrameReader, Geometry as FrameSize, MediaCommand,
};
use lipsync_schemas::FaceTrack;

use crate::align::Geometry;
use crate::detect::{Batch, Detector, InputSpec};
use crate::error::{FaceError, Result};
use crate::select::{Filters, Policy, Selector};
use crate::track::{OnMissing, TrackBuilder};

/// Tracking settings independent of the detector.
#[derive(Debug, Clone)]
pub struct TrackSettings {
    /// Candidate filters.
    pub filters: Filters,
    /// Face choice.
    pub policy: Policy,
    /// Missing-face policy.
    pub on_missing: OnMissing,
    /// Longest bridged gap in frames.
    pub max_gap: usize,
    /// Frames per detector call.
    pub batch_size: usize,
    /// Batches buffered between decoder and detector.
    pub queue_batches: usize,
    /// Which stream to decode and at what size (the stage sets fetch's validated stream
    /// per job; the default is the first video stream that is not an attached picture).
    pub decode: DecodeOptions,
}

/// Progress after each batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Frames processed so far.
    pub frames: u64,
    /// Expected frame count from the container duration (if known).
    pub expected: Option<u64>,
}

impl Progress {
    /// Fraction done in [0, 1) (0 when the length is unknown).
    pub fn fraction(&self) -> f64 {
        match self.expected {
            Some(n) if n > 0 => (self.frames as f64 / n as f64).min(0.99),
            _ => 0.0,
        }
    }
}

/// Expected number of 25 fps frames from the container duration (best effort).
pub fn expected_frames(path: &Path) -> Option<u64> {
    let out = MediaCommand::ffprobe()
        .args([
            "-show_entries",
            "format=duration",
            "-of",
            "default=nw=1:nk=1",
        ])
        .input(path)
        .cpu_limit_for(None)
        .run(settings().time.for_media(None))
        .ok()?;
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((secs * f64::from(FPS)).round().max(1.0) as u64)
}

/// Opens `path` and starts the decoder thread. Returns the frame size, the input spec
/// and the batch receiver.
///
/// # Errors
/// [`FaceError::Media`] when the video cannot be probed or ffmpeg cannot start.
pub fn start_decoder(
    path: &Path,
    decode: &DecodeOptions,
    detector: &dyn Detector,
    batch_size: usize,
    queue_batches: usize,
) -> Result<(FrameSize, InputSpec, Receiver<Result<Batch>>)> {
    let mut reader = FrameReader::open_with(path, decode).map_err(|e| media_error(&e, path))?;
    let size = reader.geometry;
    let spec = detector.input_spec(size.width, size.height);
    let keep_frames = detector.needs_frames();
    let batch_size = batch_size.max(1);
    let (batch_tx, batch_rx) = sync_channel::<Result<Batch>>(queue_batches.max(1));
    let thread_spec = spec.clone();
    let thread_path = path.to_path_buf();
    std::thread::Builder::new()
        .name("face-decode".into())
        .spawn(move || {
            let (w, h) = (size.width as usize, size.height as usize);
            let mut frame = Vec::new();
            let mut next = 0u64;
            loop {
                let mut batch = Batch {
                    first: next,
                    count: 0,
                    input: Vec::with_capacity(thread_spec.len() * batch_size),
                    frames: Vec::new(),
                };
                let mut failed = None;
                while batch.count < batch_size {
                    match reader.read_into(&mut frame) {
                        Ok(true) => {
                            thread_spec.prepare(&frame, w, h, &mut batch.input);
                            if keep_frames {
                                batch.frames.push(frame.clone());
                            }
                            batch.count += 1;
                        }
                        Ok(false) => break,
                        Err(e) => {
                            failed = Some(media_error(&e, &thread_path));
                            break;
                        }
                    }
                }
                next += batch.count as u64;
                let last = batch.count < batch_size || failed.is_some();
                if batch.count > 0 && batch_tx.send(Ok(batch)).is_err() {
                    return; // The consumer stopped: dropping the reader ends ffmpeg.
                }
                if let Some(e) = failed {
                    let _ = batch_tx.send(Err(e));
                    return;
                }
                if last {
                    return;
                }
            }
        })?;
    Ok((size, spec, batch_rx))
}

/// A decode error without local paths (ffmpeg names its input in messages).
fn media_error(e: &lipsync_runtime::media::MediaError, path: &Path) -> FaceError {
    let msg = e.to_string().replace(&*path.to_string_lossy(), "input");
    FaceError::Media(msg)
}

/// Tracks the face through the whole video. `on_batch` runs after every batch; an error
/// from it stops the work (cancellation).
///
/// # Errors
/// Media, model, no-face and stop errors (see [`FaceError`]).
pub fn track_file(
    path: &Path,
    detector: &mut dyn Detector,
    geometry: &Geometry,
    settings: &TrackSettings,
    on_batch: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<FaceTrack> {
    let expected = expected_frames(path);
    let (size, spec, batches) = start_decoder(
        path,
        &settings.decode,
        detector,
        settings.batch_size,
        settings.queue_batches,
    )?;
    let mut builder = TrackBuilder::new(
        geometry.clone(),
        detector.layout(),
        Selector::new(settings.filters.clone(), settings.policy),
        settings.on_missing,
        settings.max_gap,
    );
    for batch in batches {
        let batch = batch?;
        let dets = detector.detect(&batch, &spec, size.width, size.height)?;
        for frame_dets in &dets {
            builder.push(frame_dets)?;
        }
        on_batch(Progress {
            frames: builder.len() as u64,
            expected,
        })?;
    }
    builder.finish(size.width, size.height, detector.name())
}
