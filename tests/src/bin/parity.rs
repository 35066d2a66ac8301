//! Our side of the stage-by-stage parity harness (`make parity`, `scripts/parity/`): runs
//! the project's own stage functions on the inputs the harness wrote and writes every
//! stage's output for the comparison with the reference.
//!
//! ```text
//! parity audio DIR   pcm.f32 -> mel.f32, features.f32, chunks.f32, audio.json
//! parity video DIR   frames.u8, anchors.f64, noise.f32, vae_eps_*.f32, chunks.f32 ->
//!                    affine.f64, crops.u8, mask.f32, masked.f32, reference.f32,
//!                    vae_masked.f32, vae_reference.f32, step<i>.f32 (latents after
//!                    DDIM step i), pasted.u8, restored.u8 (our edge), restored_refedge.u8 (the reference's)
//! ```
//!
//! `DIR/config.json` names the model folder and the run's settings. Arrays are raw
//! little-endian, C order, shapes as listed in `scripts/parity/parity.py`. The two
//! commands run in separate processes because each stage crate owns its ONNX Runtime
//! environment.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lipsync_audio::encoder::{EncoderOptions, OrtEncoder};
use lipsync_audio::mel::MelCollector;
use lipsync_audio::windows::{LAYERS, POSITION_VALUES, encode_all};
use lipsync_face::align::{Aligner, Geometry};
use lipsync_infer::crops::CropsCodec;
use lipsync_infer::ddim::{Ddim, chunk_ranges};
use lipsync_infer::engine::{Device, Engine, EngineOptions};
use lipsync_infer::frames::CropGeometry;
use lipsync_infer::image::{invert_affine, paste_back, push_planar, resize_lanczos, warp_affine};
use lipsync_infer::mask::Mask;
use lipsync_infer::pipeline::{ChunkModelInput, JobParams, VaeNoise, denoise_chunk};
use lipsync_mux::blend::Blender;
use lipsync_runtime::features::AudioFeatures;
use lipsync_runtime::models::{Manifest, ResolvedProfile};
use lipsync_schemas::LengthMode;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Config {
    /// The model manifest (`models/manifest.toml`).
    manifest: PathBuf,
    /// Profile name in the manifest.
    profile: String,
    /// Folder of the exported graphs.
    models_dir: PathBuf,
    /// ONNX Runtime intra-op threads.
    threads: usize,
    /// Frames and their size.
    frames: usize,
    width: usize,
    height: usize,
    /// DDIM steps, guidance, frames per UNet call.
    steps: u32,
    guidance: f64,
    frames_per_chunk: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (cmd, dir) = match args.as_slice() {
        [_, cmd, dir] => (cmd.as_str(), PathBuf::from(dir)),
        _ => bail!("usage: parity audio|video DIR"),
    };
    let cfg: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?).context("config.json")?;
    match cmd {
        "audio" => audio(&cfg, &dir),
        "video" => video(&cfg, &dir),
        other => bail!("unknown command `{other}` (audio or video)"),
    }
}

fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let b = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_f64(path: &Path) -> Result<Vec<f64>> {
    let b = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn write_f32(path: &Path, v: &[f32]) -> Result<()> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(std::fs::write(path, b)?)
}

fn write_f64(path: &Path, v: &[f64]) -> Result<()> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(std::fs::write(path, b)?)
}

fn audio(cfg: &Config, dir: &Path) -> Result<()> {
    let pcm = read_f32(&dir.join("pcm.f32"))?;
    let mut mel = MelCollector::new();
    mel.push(&pcm);
    let mel = mel.finish().map_err(|e| anyhow::anyhow!("mel: {e:?}"))?;
    write_f32(&dir.join("mel.f32"), &mel.normalized())?;
    let opts = EncoderOptions {
        device: lipsync_audio::encoder::Device::Cpu,
        intra_threads: cfg.threads,
        dylib: None,
    };
    let mut enc = OrtEncoder::load(&cfg.models_dir.join("whisper_encoder.onnx"), &opts)?;
    let mut data = Vec::new();
    let t = encode_all(
        &mel,
        0,
        &mut enc,
        |_, _| Ok(()),
        |rows| {
            data.extend_from_slice(rows);
            Ok(())
        },
    )?;
    assert_eq!(data.len(), t * POSITION_VALUES);
    write_f32(&dir.join("features.f32"), &data)?;
    let features = AudioFeatures {
        t,
        layers: LAYERS,
        dim: POSITION_VALUES / LAYERS,
        data,
    };
    let n = features.frame_count();
    let chunks: Vec<f32> = (0..n).flat_map(|i| features.chunk(i)).collect();
    write_f32(&dir.join("chunks.f32"), &chunks)?;
    let meta = serde_json::json!({"mel_frames": mel.frames, "t": t, "chunks": n});
    std::fs::write(dir.join("audio.json"), meta.to_string())?;
    Ok(())
}

fn profile(cfg: &Config) -> Result<ResolvedProfile> {
    let manifest = Manifest::load(&cfg.manifest)?;
    let profile = manifest
        .profiles
        .get(&cfg.profile)
        .with_context(|| format!("profile {} not in the manifest", cfg.profile))?
        .clone();
    Ok(ResolvedProfile {
        name: cfg.profile.clone(),
        profile,
        dir: cfg.models_dir.clone(),
    })
}

fn video(cfg: &Config, dir: &Path) -> Result<()> {
    let rp = profile(cfg)?;
    let p = &rp.profile;
    let (n, w, h) = (cfg.frames, cfg.width, cfg.height);
    let r = p.resolution as usize;
    let g = CropGeometry {
        crop_w: p.face.crop_width as usize,
        crop_h: p.face.crop_height as usize,
        resolution: r,
        fill: p.face.warp_fill,
    };
    let frames = std::fs::read(dir.join("frames.u8"))?;
    let fb = w * h * 3;
    if frames.len() != n * fb {
        bail!("frames.u8: {} bytes, expected {}", frames.len(), n * fb);
    }

    // Face stage: the similarity fit with the smoothed bias, stored as f32 in the track.
    let anchors = read_f64(&dir.join("anchors.f64"))?;
    let mut aligner = Aligner::new(&Geometry {
        profile: cfg.profile.clone(),
        crop_w: p.face.crop_width,
        crop_h: p.face.crop_height,
        resolution: p.resolution,
        template: p.face.template,
        smoothing: p.face.smoothing,
    });
    let mut affines = Vec::with_capacity(n);
    for k in 0..n {
        let a = &anchors[k * 6..k * 6 + 6];
        let pts = [[a[0], a[1]], [a[2], a[3]], [a[4], a[5]]];
        let m = aligner.align(&pts).context("degenerate anchors")?;
        affines.push(m.map(|row| row.map(|v| v as f32)));
    }
    let flat: Vec<f64> = affines
        .iter()
        .flat_map(|m| m.iter().flat_map(|row| row.map(f64::from)))
        .collect();
    write_f64(&dir.join("affine.f64"), &flat)?;

    // Infer stage: warp + resize (the crop store's recipe), mask, planar inputs.
    let mut crops = Vec::with_capacity(n * g.frame_bytes());
    let mut warped = Vec::new();
    for (k, m) in affines.iter().enumerate() {
        let inv = invert_affine(m).context("singular affine")?;
        let frame = &frames[k * fb..(k + 1) * fb];
        warp_affine(frame, w, h, &inv, (g.crop_w, g.crop_h), g.fill, &mut warped);
        crops.extend(resize_lanczos(&warped, g.crop_w, g.crop_h, 3, r, r));
    }
    std::fs::write(dir.join("crops.u8"), &crops)?;
    let mask = Mask::load(&rp.mask_path(), p.mask.size as usize, r)?;
    write_f32(&dir.join("mask.f32"), mask.pixels())?;
    let crop = |k: usize| &crops[k * g.frame_bytes()..(k + 1) * g.frame_bytes()];
    let mut masked = Vec::new();
    let mut reference = Vec::new();
    for k in 0..n {
        push_planar(crop(k), Some(mask.pixels()), &mut masked);
        push_planar(crop(k), None, &mut reference);
    }
    write_f32(&dir.join("masked.f32"), &masked)?;
    write_f32(&dir.join("reference.f32"), &reference)?;

    // Model: VAE encode with the injected posterior noise, DDIM from the injected initial
    // noise, VAE decode, paste-back.
    let mut engine = Engine::load(
        &rp,
        &EngineOptions {
            device: Device::Cpu,
            intra_threads: cfg.threads,
            dylib: None,
        },
        0,
    )?;
    let ddim = Ddim::new(&p.scheduler, cfg.steps)?;
    let params = JobParams {
        geometry: g,
        steps: cfg.steps,
        guidance: cfg.guidance,
        seed: 0,
        vae_sample: true,
        length_mode: LengthMode::Cut,
        frames_per_chunk: cfg.frames_per_chunk,
        scaling: p.vae.scaling_factor,
        prefetch: 1,
        codec: CropsCodec::Ffv1,
        video_stream: None,
    };
    let noise = read_f32(&dir.join("noise.f32"))?;
    let eps_masked = read_f32(&dir.join("vae_eps_masked.f32"))?;
    let eps_reference = read_f32(&dir.join("vae_eps_reference.f32"))?;
    let audio = read_f32(&dir.join("chunks.f32"))?;
    let (plane, lat, tok) = (3 * r * r, 4 * (r / 8) * (r / 8), 50 * 384);
    if audio.len() < n * tok {
        bail!("chunks.f32 holds fewer than {n} audio chunks");
    }
    let mut vae_masked = Vec::new();
    let mut vae_reference = Vec::new();
    // Latents after each DDIM step, per chunk `[4, F, h, w]`, concatenated over the chunks.
    let mut steps: Vec<Vec<f32>> = vec![Vec::new(); ddim.timesteps().len()];
    let mut pasted = Vec::with_capacity(n * g.frame_bytes());
    for (index, range) in chunk_ranges(n, cfg.frames_per_chunk)
        .into_iter()
        .enumerate()
    {
        let (a, b) = (range.start, range.end);
        let input = ChunkModelInput {
            index,
            frames: b - a,
            masked: &masked[a * plane..b * plane],
            reference: &reference[a * plane..b * plane],
            audio: &audio[a * tok..b * tok],
        };
        let mut kinds = String::new();
        let decoded = denoise_chunk(
            &mut engine,
            &ddim,
            &params,
            &mask,
            &noise,
            &input,
            VaeNoise::Given {
                masked: &eps_masked[a * lat..b * lat],
                reference: &eps_reference[a * lat..b * lat],
            },
            &mut kinds,
            &mut |m, rf| {
                vae_masked.extend_from_slice(m);
                vae_reference.extend_from_slice(rf);
            },
            &mut |_| true,
            Some(&mut |i, latents| steps[i].extend_from_slice(latents)),
        )?;
        let mut rgb = Vec::new();
        for (j, k) in range.enumerate() {
            paste_back(
                &decoded[j * plane..(j + 1) * plane],
                crop(k),
                mask.pixels(),
                &mut rgb,
            );
            pasted.extend_from_slice(&rgb);
        }
        eprintln!("parity: chunk {index} ({} frames, {kinds})", b - a);
    }
    // Latents are per chunk `[4, F, h, w]`, concatenated over the chunks.
    write_f32(&dir.join("vae_masked.f32"), &vae_masked)?;
    write_f32(&dir.join("vae_reference.f32"), &vae_reference)?;
    for (i, latents) in steps.iter().enumerate() {
        write_f32(&dir.join(format!("step{}.f32", i + 1)), latents)?;
    }
    std::fs::write(dir.join("pasted.u8"), &pasted)?;

    // Mux stage: paste the crop back into the frame, with our edge and the reference's.
    for (reference_edge, name) in [(false, "restored.u8"), (true, "restored_refedge.u8")] {
        let mut blender = Blender::new(w, h, g.crop_w, g.crop_h, r);
        blender.set_reference_edge(reference_edge);
        let mut restored = Vec::with_capacity(n * fb);
        for (k, m) in affines.iter().enumerate() {
            let mut frame = frames[k * fb..(k + 1) * fb].to_vec();
            let crop = &pasted[k * g.frame_bytes()..(k + 1) * g.frame_bytes()];
            blender.blend(&mut frame, crop, m)?;
            restored.extend_from_slice(&frame);
        }
        std::fs::write(dir.join(name), &restored)?;
    }
    Ok(())
}
