//! ONNX Runtime sessions of one GPU worker: VAE encoder, VAE decoder and UNet of the
//! resolved profile, created once at start-up. Every model run is timed, so the stage can
//! report its duty cycle (time inside model runs / wall time).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lipsync_runtime::models::ResolvedProfile;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::TensorRef;

use crate::error::{InferError, Result};

/// Where the models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when built with the `cuda` feature and offered by ONNX Runtime, else CPU.
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA only.
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!(
                "infer.device must be auto, cpu or cuda, not `{other}`"
            )),
        }
    }
}

/// How sessions are built.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Execution provider choice.
    pub device: Device,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub intra_threads: usize,
    /// ONNX Runtime library (None: `ORT_DYLIB_PATH`).
    pub dylib: Option<PathBuf>,
}

static ENV: OnceLock<std::result::Result<Arc<Environment>, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process and returns its environment.
fn environment(dylib: Option<&Path>) -> Result<Arc<Environment>> {
    ENV.get_or_init(|| {
        let builder = match dylib {
            Some(p) => ort::init_from(p).map_err(|e| format!("cannot load onnx runtime: {e}"))?,
            None => {
                if std::env::var_os("ORT_DYLIB_PATH").is_none() {
                    return Err(
                        "onnx runtime library not configured: set ORT_DYLIB_PATH or infer.ort_dylib_path (run `make setup`)"
                            .into(),
                    );
                }
                ort::init()
            }
        };
        builder
            .with_name("lipsync-infer")
            .build()
            .map(Arc::new)
            .map_err(|e| format!("cannot start onnx runtime: {e}"))
    })
    .clone()
    .map_err(InferError::Model)
}

/// The three sessions of one worker and the time spent inside them.
pub struct Engine {
    vae_encoder: Session,
    vae_decoder: Session,
    unet: Session,
    /// Execution provider actually requested (`cpu` or `cuda:<id>`).
    pub provider: String,
    busy: Duration,
    unet_busy: Duration,
    /// UNet runs since start-up.
    pub unet_runs: u64,
}

impl Engine {
    /// Returns the sessions of `profile` for worker `device_id`.
    ///
    /// # Errors
    /// ONNX Runtime cannot be loaded, CUDA was required but is unavailable, or a model
    /// does not load.
    pub fn load(profile: &ResolvedProfile, opts: &EngineOptions, device_id: usize) -> Result<Self> {
        let env = environment(opts.dylib.as_deref())?;
        let use_cuda = want_cuda(opts.device)?;
        let provider = if use_cuda {
            format!("cuda:{device_id}")
        } else {
            "cpu".to_owned()
        };
        let open = |role: &str| -> Result<Session> {
            let path = profile
                .model_path(role)
                .ok_or_else(|| InferError::Model(format!("profile has no `{role}` model")))?;
            let builder = Session::builder(&env)?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(ort::Error::from)?;
            let builder = with_threads(builder, opts.intra_threads)?;
            let mut builder = with_provider(builder, use_cuda, device_id)?;
            builder
                .commit_from_file(&path)
                .map_err(|e| InferError::Model(format!("cannot load the {role} model: {e}")))
        };
        Ok(Self {
            vae_encoder: open("vae_encoder")?,
            vae_decoder: open("vae_decoder")?,
            unet: open("unet")?,
            provider,
            busy: Duration::ZERO,
            unet_busy: Duration::ZERO,
            unet_runs: 0,
        })
    }

    /// Returns the time spent inside UNet runs.
    pub fn unet_busy(&self) -> Duration {
        self.unet_busy
    }

    /// Returns the total time spent inside model runs.
    pub fn busy(&self) -> Duration {
        self.busy
    }

    /// Encodes `n` planar [-1, 1] images of `r x r`; returns the posterior mean and
    /// log-variance, each `[n, 4, r/8, r/8]`.
    pub fn vae_encode(
        &mut self,
        images: &[f32],
        n: usize,
        r: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let start = Instant::now();
        let input = TensorRef::from_array_view(([n, 3, r, r], images))?;
        let out = self.vae_encoder.run(ort::inputs!["image" => input])?;
        let (_, mean) = out["latent_mean"].try_extract_tensor::<f32>()?;
        let (_, logvar) = out["latent_logvar"].try_extract_tensor::<f32>()?;
        let res = (mean.to_vec(), logvar.to_vec());
        drop(out);
        self.busy += start.elapsed();
        Ok(res)
    }

    /// Decodes `n` latents `[n, 4, h, w]` (already divided by the scaling factor);
    /// returns planar images `[n, 3, 8h, 8w]`.
    pub fn vae_decode(
        &mut self,
        latents: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let input = TensorRef::from_array_view(([n, 4, h, w], latents))?;
        let out = self.vae_decoder.run(ort::inputs!["latent" => input])?;
        let (_, image) = out["image"].try_extract_tensor::<f32>()?;
        let res = image.to_vec();
        drop(out);
        self.busy += start.elapsed();
        Ok(res)
    }

    /// Runs the UNet on `sample` `[b, 13, f, h, w]` at timestep `t` with audio embeds
    /// `[b*f, 50, 384]`; returns the noise prediction `[b, 4, f, h, w]`.
    pub fn unet(
        &mut self,
        sample: &[f32],
        shape: [usize; 5],
        t: i64,
        audio: &[f32],
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let [b, _, f, _, _] = shape;
        let sample = TensorRef::from_array_view((shape, sample))?;
        let timestep = [t];
        let timestep = TensorRef::from_array_view(([1usize], &timestep[..]))?;
        let tokens = audio.len() / (b * f * 384).max(1);
        let audio = TensorRef::from_array_view(([b * f, tokens, 384], audio))?;
        let out = self.unet.run(ort::inputs![
            "sample" => sample,
            "timestep" => timestep,
            "encoder_hidden_states" => audio,
        ])?;
        let (_, eps) = out["noise_pred"].try_extract_tensor::<f32>()?;
        let res = eps.to_vec();
        drop(out);
        let spent = start.elapsed();
        self.busy += spent;
        self.unet_busy += spent;
        self.unet_runs += 1;
        Ok(res)
    }
}

fn with_threads(builder: SessionBuilder, threads: usize) -> Result<SessionBuilder> {
    if threads == 0 {
        return Ok(builder);
    }
    Ok(builder
        .with_intra_threads(threads)
        .map_err(ort::Error::from)?)
}

#[cfg(feature = "cuda")]
fn want_cuda(device: Device) -> Result<bool> {
    use ort::ep::ExecutionProvider;
    let available = ort::ep::CUDA::is_available().unwrap_or(false);
    match device {
        Device::Cpu => Ok(false),
        Device::Auto => Ok(available),
        Device::Cuda if available => Ok(true),
        Device::Cuda => Err(InferError::Model(
            "infer.device = cuda but onnx runtime offers no CUDA provider (install onnxruntime-gpu and point ORT_DYLIB_PATH at it)".into(),
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn want_cuda(device: Device) -> Result<bool> {
    match device {
        Device::Cpu | Device::Auto => Ok(false),
        Device::Cuda => Err(InferError::Model(
            "infer.device = cuda but this binary was built without the `cuda` feature".into(),
        )),
    }
}

#[cfg(feature = "cuda")]
fn with_provider(builder: SessionBuilder, cuda: bool, device_id: usize) -> Result<SessionBuilder> {
    if !cuda {
        return Ok(builder);
    }
    let ep = ort::ep::CUDA::default()
        .with_device_id(device_id as i32)
        .build()
        .error_on_failure();
    Ok(builder
        .with_execution_providers([ep])
        .map_err(ort::Error::from)?)
}

#[cfg(not(feature = "cuda"))]
fn with_provider(
    builder: SessionBuilder,
    _cuda: bool,
    _device_id: usize,
) -> Result<SessionBuilder> {
    Ok(builder)
}
