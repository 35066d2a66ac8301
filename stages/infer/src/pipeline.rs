//! One job's inference, pipelined over threads so the model never waits on the CPU:
//!
//! ```text
//! decode+warp ──> crop store (scratch file) ──> chunk prep ──[bounded]──> model ──[bounded]──> paste+encode
//! (FrameReader)   (random access by index)     (masks, audio)           (VAE, DDIM    (ffmpeg, crops.mkv)
//!                                                                         UNet, VAE)
//! ```
//!
//! Per 16-frame chunk (the last shorter; docs/architecture.md §9.1, §9.5): VAE-encode the masked and
//! the reference crops (posterior mean, or a seeded sample), scale by 0.18215; start from
//! the job's one noise tensor `(1,4,1,h,w)` repeated over the frames; run DDIM with the
//! UNet input `[noise 4 | mask 1 | masked 4 | reference 4]` and classifier-free guidance
//! (all-zero audio for the unconditional half) when guidance > 1; decode; paste the
//! surrounding pixels back with the keep-mask. Frames without a face skip generation and
//! keep their warped crop.

use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use lipsync_runtime::features::{AudioFeatures, WINDOW_AFTER, WINDOW_BEFORE};
use lipsync_runtime::media::{DecodeOptions, LengthMode, output_len, source_frame};
use lipsync_runtime::models::SchedulerSpec;
use lipsync_schemas::FaceTrack;

use crate::crops::{CropsCodec, CropsWriter};
use crate::ddim::{Ddim, chunk_ranges};
use crate::engine::Engine;
use crate::error::{InferError, Result};
use crate::frames::{CropGeometry, CropStore};
use crate::image::{paste_back, push_planar};
use crate::mask::Mask;
use crate::noise::{Gaussian, STREAM_LATENTS, STREAM_VAE_BASE};

/// Audio tokens per frame and their width (Whisper tiny: 10 positions x 5 layers, 384).
pub const AUDIO_TOKENS: usize = 50;
/// Width of an audio token.
pub const AUDIO_DIM: usize = 384;

/// Parameters of one job.
#[derive(Debug, Clone)]
pub struct JobParams {
    /// Crop geometry and model resolution.
    pub geometry: CropGeometry,
    /// DDIM steps.
    pub steps: u32,
    /// Classifier-free guidance scale (CFG when > 1).
    pub guidance: f64,
    /// Noise seed.
    pub seed: u64,
    /// Sample the VAE posterior instead of taking its mean.
    pub vae_sample: bool,
    /// Video-to-audio length policy.
    pub length_mode: LengthMode,
    /// Frames per UNet call (16).
    pub frames_per_chunk: usize,
    /// VAE latent scaling factor (0.18215).
    pub scaling: f64,
    /// Chunks queued between the threads.
    pub prefetch: usize,
    /// Codec of the crops artifact.
    pub codec: CropsCodec,
    /// The video stream fetch validated (None: the first that is not an attached
    /// picture).
    pub video_stream: Option<lipsync_schemas::VideoStream>,
}

/// Decides after every denoising step whether the job goes on.
pub trait Control: Send {
    /// Called after step `done` of `total` (all chunks together); `false` stops the job.
    fn step(&mut self, done: u64, total: u64) -> bool;
}

/// What a finished job measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Output frames written to the crops file.
    pub output_frames: u64,
    /// Chunks that ran through the model.
    pub chunks_generated: usize,
    /// Denoising steps run (per chunk, per step; one UNet call each).
    pub unet_steps: u64,
    /// Time inside UNet runs.
    pub unet_time: Duration,
    /// Time inside all model runs (VAE and UNet).
    pub model_time: Duration,
    /// Wall time of the whole job (decode to the last encoded frame).
    pub wall_time: Duration,
    /// Time the model thread waited for a prepared chunk.
    pub model_wait: Duration,
    /// UNet calls of each generated chunk, in order: `E` exact (plain UNet), `F` DeepCache
    /// full step, `S` DeepCache shallow step.
    pub unet_schedule: Vec<String>,
    /// DeepCache full / shallow steps and the time inside each kind.
    pub deepcache: crate::engine::DeepCacheStats,
}

impl Report {
    /// Returns the mean milliseconds of one UNet call.
    pub fn unet_time_ms_per_step(&self) -> f64 {
        self.unet_time.as_secs_f64() * 1e3 / self.unet_steps.max(1) as f64
    }

    /// Returns the mean milliseconds of model time per generated chunk (VAE + steps).
    pub fn model_ms_per_chunk(&self) -> f64 {
        self.model_time.as_secs_f64() * 1e3 / self.chunks_generated.max(1) as f64
    }

    /// Returns the time inside model runs over the wall time.
    pub fn duty_cycle(&self) -> f64 {
        self.model_time.as_secs_f64() / self.wall_time.as_secs_f64().max(1e-9)
    }
}

/// Inputs of one job.
pub struct JobInputs<'a> {
    /// The original video (local file).
    pub video: &'a Path,
    /// Its face track.
    pub track: &'a FaceTrack,
    /// The audio features.
    pub features: &'a AudioFeatures,
    /// The keep-mask at `R x R`.
    pub mask: &'a Mask,
}

/// Returns the number of output frames of a job.
pub fn output_frames(track: &FaceTrack, features: &AudioFeatures, mode: LengthMode) -> usize {
    output_len(track.frames.len(), features.frame_count(), mode)
}

struct ChunkIn {
    index: usize,
    /// RGB24 crops of every output frame of the chunk.
    crops: Vec<u8>,
    /// Whether each frame has a face (generated) or passes through.
    present: Vec<bool>,
    masked: Vec<f32>,
    reference: Vec<f32>,
    audio: Vec<f32>,
}

struct ChunkOut {
    crops: Vec<u8>,
    present: Vec<bool>,
    /// Planar decoded images of the present frames, in order.
    decoded: Vec<f32>,
}

/// Runs one job and writes the crops file `out`. Blocking; call from a worker thread.
///
/// # Errors
/// Invalid inputs, a failed model run or encoder, or [`InferError::Stopped`] when
/// `control` asked to stop.
pub fn run(
    engine: &mut Engine,
    scheduler: &SchedulerSpec,
    params: &JobParams,
    inputs: &JobInputs<'_>,
    scratch: &Path,
    out: &Path,
    control: &mut dyn Control,
) -> Result<Report> {
    let started = Instant::now();
    let g = params.geometry;
    let JobInputs {
        track, features, ..
    } = *inputs;
    check_inputs(track, features, g)?;
    let ddim = Ddim::new(scheduler, params.steps)?;
    let n_video = track.frames.len();
    let n_out = output_frames(track, features, params.length_mode);
    if n_out == 0 {
        return Err(InferError::Input(
            "no output frames (empty video or audio)".into(),
        ));
    }
    let mode = params.length_mode;
    let ranges = chunk_ranges(n_out, params.frames_per_chunk);
    let present_of = |k: usize| track.frames[source_frame(k, n_video, mode)].present;
    let generated_chunks = ranges
        .iter()
        .filter(|r| (*r).clone().any(&present_of))
        .count();
    let total_steps = generated_chunks as u64 * u64::from(params.steps);
    let store = CropStore::new(scratch, g)?;
    let needed = n_video.min(n_out);
    let busy_before = engine.busy();
    let dc_before = engine.deepcache_stats;
    let runs_before = engine.unet_runs;
    let unet_before = engine.unet_busy();

    let (in_tx, in_rx) = sync_channel::<ChunkIn>(params.prefetch.max(1));
    let (out_tx, out_rx) = sync_channel::<ChunkOut>(params.prefetch.max(1));
    let mut report = Report::default();
    let decode = DecodeOptions::validated(params.video_stream);
    let result = std::thread::scope(|s| {
        let producer = s.spawn(|| store.produce(inputs.video, &decode, track, needed));
        let prep = s.spawn(|| {
            let r = prepare_chunks(&store, inputs, params, &ranges, n_video, in_tx);
            if r.is_err() {
                store.abort();
            }
            r
        });
        let writer = s.spawn(|| write_crops(out, g, inputs.mask, params.codec, out_rx));
        let model = denoise_all(
            engine,
            &ddim,
            params,
            inputs.mask,
            in_rx,
            out_tx,
            control,
            total_steps,
            &mut report,
        );
        if model.is_err() {
            store.abort();
        }
        let written = writer.join().expect("writer thread");
        let prep = prep.join().expect("chunk thread");
        let produced = producer.join().expect("decoder thread");
        // The first real cause wins over the follow-up "stopped" of the other threads.
        let frames = written;
        let mut stopped = false;
        for r in [
            model,
            prep,
            produced,
            frames.as_ref().map(|_| ()).map_err(|_| InferError::Stopped),
        ] {
            match r {
                Err(InferError::Stopped) => stopped = true,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        match frames {
            Err(e) if !matches!(e, InferError::Stopped) => Err(e),
            _ if stopped => Err(InferError::Stopped),
            other => other,
        }
    });
    let frames = result?;
    if frames != n_out as u64 {
        return Err(InferError::Encode(format!(
            "wrote {frames} crops, expected {n_out}"
        )));
    }
    report.output_frames = frames;
    report.unet_steps = engine.unet_runs - runs_before;
    report.model_time = engine.busy() - busy_before;
    report.unet_time = engine.unet_busy() - unet_before;
    let dc = engine.deepcache_stats;
    report.deepcache = crate::engine::DeepCacheStats {
        full_runs: dc.full_runs - dc_before.full_runs,
        full_busy: dc.full_busy - dc_before.full_busy,
        shallow_runs: dc.shallow_runs - dc_before.shallow_runs,
        shallow_busy: dc.shallow_busy - dc_before.shallow_busy,
    };
    report.wall_time = started.elapsed();
    Ok(report)
}

fn check_inputs(track: &FaceTrack, features: &AudioFeatures, g: CropGeometry) -> Result<()> {
    if features.layers * (WINDOW_BEFORE + WINDOW_AFTER) != AUDIO_TOKENS || features.dim != AUDIO_DIM
    {
        return Err(InferError::Input(format!(
            "audio features have {} layers x {} channels; the model needs 5 x {AUDIO_DIM}",
            features.layers, features.dim
        )));
    }
    if (track.crop_w as usize, track.crop_h as usize) != (g.crop_w, g.crop_h)
        || track.resolution as usize != g.resolution
    {
        return Err(InferError::Input(format!(
            "face track was made for {}x{} crops at {} px; the model profile needs {}x{} at {} px",
            track.crop_w, track.crop_h, track.resolution, g.crop_w, g.crop_h, g.resolution
        )));
    }
    Ok(())
}

fn prepare_chunks(
    store: &CropStore,
    inputs: &JobInputs<'_>,
    params: &JobParams,
    ranges: &[std::ops::Range<usize>],
    n_video: usize,
    tx: SyncSender<ChunkIn>,
) -> Result<()> {
    let fb = params.geometry.frame_bytes();
    let mask = inputs.mask.pixels();
    for (index, range) in ranges.iter().enumerate() {
        let f_all = range.len();
        let mut crops = vec![0u8; f_all * fb];
        let mut present = Vec::with_capacity(f_all);
        let mut masked = Vec::new();
        let mut reference = Vec::new();
        let mut audio = Vec::new();
        for (j, k) in range.clone().enumerate() {
            let src = source_frame(k, n_video, params.length_mode);
            let crop = &mut crops[j * fb..(j + 1) * fb];
            store.read(src, crop)?;
            let has_face = inputs.track.frames[src].present;
            present.push(has_face);
            if has_face {
                push_planar(crop, Some(mask), &mut masked);
                push_planar(crop, None, &mut reference);
                audio.extend_from_slice(&inputs.features.chunk(k));
            }
        }
        let chunk = ChunkIn {
            index,
            crops,
            present,
            masked,
            reference,
            audio,
        };
        if tx.send(chunk).is_err() {
            return Err(InferError::Stopped);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn denoise_all(
    engine: &mut Engine,
    ddim: &Ddim,
    params: &JobParams,
    mask: &Mask,
    rx: Receiver<ChunkIn>,
    tx: SyncSender<ChunkOut>,
    control: &mut dyn Control,
    total_steps: u64,
    report: &mut Report,
) -> Result<()> {
    let r = params.geometry.resolution;
    let (h, w) = (r / 8, r / 8);
    let noise = Gaussian::new(params.seed, STREAM_LATENTS).vec_f32(4 * h * w);
    let mut done = 0u64;
    loop {
        let wait = Instant::now();
        let Ok(chunk) = rx.recv() else { break };
        report.model_wait += wait.elapsed();
        let f = chunk.present.iter().filter(|p| **p).count();
        let decoded = if f == 0 {
            Vec::new()
        } else {
            let mut kinds = String::new();
            let input = ChunkModelInput {
                index: chunk.index,
                frames: f,
                masked: &chunk.masked,
                reference: &chunk.reference,
                audio: &chunk.audio,
            };
            let d = denoise_chunk(
                engine,
                ddim,
                params,
                mask,
                &noise,
                &input,
                VaeNoise::Params,
                &mut kinds,
                &mut |_, _| {},
                &mut |_| {
                    done += 1;
                    control.step(done, total_steps)
                },
                None,
            )?;
            report.chunks_generated += 1;
            report.unet_schedule.push(kinds);
            d
        };
        let out = ChunkOut {
            crops: chunk.crops,
            present: chunk.present,
            decoded,
        };
        if tx.send(out).is_err() {
            return Err(InferError::Stopped);
        }
    }
    Ok(())
}

/// The model inputs of one chunk: the planar [-1, 1] masked and reference crops of its
/// `frames` generated frames (`[F, 3, R, R]` each) and their audio chunks
/// (`[F, 50, 384]`).
pub struct ChunkModelInput<'a> {
    /// Chunk index in the job (selects the VAE sample's noise stream).
    pub index: usize,
    /// Generated frames `F`.
    pub frames: usize,
    /// Masked crops.
    pub masked: &'a [f32],
    /// Reference (unmasked) crops.
    pub reference: &'a [f32],
    /// Audio chunks.
    pub audio: &'a [f32],
}

/// Where the VAE posterior noise of a chunk comes from.
#[derive(Debug, Clone, Copy)]
pub enum VaeNoise<'a> {
    /// As [`JobParams::vae_sample`] says: the posterior mean, or a sample drawn from the
    /// job's seed.
    Params,
    /// A posterior sample with these standard-normal values, `[F, 4, h, w]` each (the
    /// parity harness injects the reference's draws).
    Given {
        /// Noise of the masked crops' posterior.
        masked: &'a [f32],
        /// Noise of the reference crops' posterior.
        reference: &'a [f32],
    },
}

/// Runs the VAE encoder, the DDIM loop and the VAE decoder on one chunk and returns the
/// decoded planar images `[F, 3, R, R]` (unclamped). `noise` is the `[4, h, w]` initial
/// noise, repeated over the frames. `on_latents` sees the scaled masked and reference
/// latents (`[4, F, h, w]` each), `after_step(i)` runs after each DDIM step (returning
/// `false` stops with [`InferError::Stopped`]) and `observe`, when given, sees the latents
/// `[4, F, h, w]` after every step (see [`Engine::denoise`]: for comparisons only).
///
/// # Errors
/// A failed model run, or the stop.
#[allow(clippy::too_many_arguments)]
pub fn denoise_chunk(
    engine: &mut Engine,
    ddim: &Ddim,
    params: &JobParams,
    mask: &Mask,
    noise: &[f32],
    chunk: &ChunkModelInput<'_>,
    vae_noise: VaeNoise<'_>,
    kinds: &mut String,
    on_latents: &mut dyn FnMut(&[f32], &[f32]),
    after_step: &mut dyn FnMut(usize) -> bool,
    observe: Option<crate::engine::StepObserver<'_>>,
) -> Result<Vec<f32>> {
    let f = chunk.frames;
    let r = params.geometry.resolution;
    let (h, w) = (r / 8, r / 8);
    let hw = h * w;
    let block = 4 * f * hw; // one [4, F, h, w] latent block
    let scale = params.scaling as f32;
    let mut seeded = (params.vae_sample && matches!(vae_noise, VaeNoise::Params))
        .then(|| Gaussian::new(params.seed, STREAM_VAE_BASE + chunk.index as u64));
    let mut encode = |images: &[f32], given: Option<&[f32]>| -> Result<Vec<f32>> {
        let (mean, logvar) = engine.vae_encode(images, f, r)?;
        let std = |lv: f32| (0.5 * lv).exp();
        let lat = match (given, seeded.as_mut()) {
            (Some(eps), _) => mean
                .iter()
                .zip(&logvar)
                .zip(eps)
                .map(|((m, lv), e)| m + std(*lv) * e)
                .collect(),
            (None, Some(g)) => mean
                .iter()
                .zip(&logvar)
                .map(|(m, lv)| m + std(*lv) * g.next_f64() as f32)
                .collect(),
            (None, None) => mean,
        };
        Ok(to_channel_major(&lat, f, 4, hw, scale))
    };
    let (given_masked, given_reference) = match vae_noise {
        VaeNoise::Given { masked, reference } => (Some(masked), Some(reference)),
        VaeNoise::Params => (None, None),
    };
    let masked = encode(chunk.masked, given_masked)?;
    let reference = encode(chunk.reference, given_reference)?;
    on_latents(&masked, &reference);

    // [noise 4 | mask 1 | masked 4 | reference 4] per batch item, each [C, F, h, w].
    let mask_lat = mask.latent();
    let cfg = params.guidance > 1.0;
    let batch = if cfg { 2 } else { 1 };
    let item = 13 * f * hw;
    let mut sample = vec![0f32; batch * item];
    for b in 0..batch {
        let base = b * item;
        for c in 0..4 {
            for fr in 0..f {
                let o = base + (c * f + fr) * hw;
                sample[o..o + hw].copy_from_slice(&noise[c * hw..(c + 1) * hw]);
            }
        }
        for fr in 0..f {
            let o = base + block + fr * hw;
            sample[o..o + hw].copy_from_slice(mask_lat);
        }
        let o = base + block + f * hw;
        sample[o..o + block].copy_from_slice(&masked);
        sample[o + block..o + 2 * block].copy_from_slice(&reference);
    }
    let tokens = AUDIO_TOKENS * AUDIO_DIM;
    let audio = if cfg {
        let mut a = vec![0f32; f * tokens];
        a.extend_from_slice(chunk.audio);
        a
    } else {
        chunk.audio.to_vec()
    };
    // The steps run on the provider (guidance mix and DDIM update in its `ddim_step` graph).
    let latents = engine.denoise(
        ddim,
        sample,
        [batch, 13, f, h, w],
        audio,
        params.guidance as f32,
        kinds,
        after_step,
        observe,
    )?;
    // [4, F, h, w] / scale -> [F, 4, h, w] -> decoder.
    let mut frames_first = vec![0f32; block];
    for c in 0..4 {
        for fr in 0..f {
            let src = (c * f + fr) * hw;
            let dst = (fr * 4 + c) * hw;
            for p in 0..hw {
                frames_first[dst + p] = latents[src + p] / scale;
            }
        }
    }
    engine.vae_decode(&frames_first, f, h, w)
}

/// `[F, C, hw]` -> `[C, F, hw]`, times `scale`.
fn to_channel_major(x: &[f32], f: usize, c: usize, hw: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for fr in 0..f {
        for ch in 0..c {
            let src = (fr * c + ch) * hw;
            let dst = (ch * f + fr) * hw;
            for p in 0..hw {
                out[dst + p] = x[src + p] * scale;
            }
        }
    }
    out
}

fn write_crops(
    out: &Path,
    g: CropGeometry,
    mask: &Mask,
    codec: CropsCodec,
    rx: Receiver<ChunkOut>,
) -> Result<u64> {
    let fb = g.frame_bytes();
    let plane = 3 * g.resolution * g.resolution;
    let mut writer = CropsWriter::create(out, g.resolution, codec)?;
    let mut rgb = Vec::with_capacity(fb);
    for chunk in rx {
        let mut generated = 0;
        for (j, present) in chunk.present.iter().enumerate() {
            let crop = &chunk.crops[j * fb..(j + 1) * fb];
            if *present {
                let dec = &chunk.decoded[generated * plane..(generated + 1) * plane];
                paste_back(dec, crop, mask.pixels(), &mut rgb);
                writer.write(&rgb)?;
                generated += 1;
            } else {
                writer.write(crop)?;
            }
        }
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_major_transpose_and_scale() {
        // F=2, C=2, hw=1: [[a0,a1],[b0,b1]] -> [[a0,b0],[a1,b1]]
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(to_channel_major(&x, 2, 2, 1, 2.0), vec![2.0, 6.0, 4.0, 8.0]);
    }
}
