//! ONNX Runtime sessions of one GPU worker: VAE encoder, VAE decoder, UNet and DDIM step of
//! the resolved profile (plus the DeepCache pair when `infer.deepcache_interval > 0`),
//! created once at start-up. Every model run is timed, so the stage can report its duty
//! cycle (time inside model runs / wall time).
//!
//! The DDIM loop of a chunk ([`Engine::denoise`]) runs through IO binding: the UNet input,
//! the noise prediction, the latents, the audio embeds and the DeepCache feature stay where
//! the provider put them (device memory under CUDA) from the first step to the last; the
//! guidance mix, the DDIM update and the next UNet input come from the `ddim_step` graph on
//! the same provider. Only the final latents come back to the host.
//!
//! Provider policy (nothing falls back silently): `infer.device = cuda` needs CUDA;
//! `cpu` runs on the CPU (a real profile then logs a loud warning and the
//! `lipsync_infer_provider{provider="cpu",real="true"}` series fires an alert); `auto` takes
//! CUDA when it works and otherwise runs the CPU only for the random-weight `tiny` profile:
//! a real profile refuses to start, because a GPU node that quietly runs LatentSync on its
//! CPU would accept jobs and take hours per clip. A crash-looping pod is loud and its work
//! stays queued for healthy replicas.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lipsync_runtime::models::ResolvedProfile;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor, TensorRef};

use crate::ddim::{Ddim, deepcache_full_step};
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

/// Settings beyond [`EngineOptions`] (DeepCache, TensorRT), from the `[infer]` section.
#[derive(Debug, Clone, Default)]
pub struct EngineExtras {
    /// DeepCache interval: 0 = exact (plain UNet every step), n = a full step every n-th
    /// step of a chunk and the shallow step in between (the reference's helper schedule).
    pub deepcache_interval: u32,
    /// The model manifest, to verify the DeepCache graphs (None: not verified).
    pub manifest: Option<PathBuf>,
    /// TensorRT execution provider (before CUDA) with its engine cache in this folder.
    pub tensorrt_cache: Option<PathBuf>,
}

impl EngineExtras {
    /// Reads the extras from a configuration.
    ///
    /// # Errors
    /// An out-of-range `deepcache_interval`.
    pub fn from_config(cfg: &lipsync_runtime::Config) -> Result<Self> {
        let i = &cfg.infer;
        if i.deepcache_interval > 50 {
            return Err(InferError::BadRequest(format!(
                "infer.deepcache_interval must be 0 (exact) to 50, not {}",
                i.deepcache_interval
            )));
        }
        Ok(Self {
            deepcache_interval: i.deepcache_interval,
            manifest: Some(cfg.models.manifest.clone()),
            tensorrt_cache: i.tensorrt.then(|| {
                i.tensorrt_cache_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(".local/trt-cache"))
            }),
        })
    }
}

/// Roles of the DeepCache pair (models/manifest.toml).
pub const DEEPCACHE_ROLES: [&str; 2] = ["unet_deepcache_full", "unet_deepcache_shallow"];

/// Role of the DDIM step graph (models/manifest.toml).
pub const DDIM_STEP_ROLE: &str = "ddim_step";

/// Which execution provider the policy picks, before any session exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// CPU provider.
    Cpu,
    /// CUDA must work (session creation fails otherwise).
    Cuda,
    /// Try CUDA; if it does not work, the CPU (only the random-weight profile).
    CudaElseCpu,
}

/// The provider policy (see the module docs). `cuda_built`: this binary and its ONNX Runtime
/// library offer the CUDA provider; `real`: the profile has real weights.
///
/// # Errors
/// `cuda` without CUDA; `auto` without CUDA for a real profile.
pub fn choose(device: Device, cuda_built: bool, real: bool, profile: &str) -> Result<Choice> {
    let no_cuda = || {
        if cfg!(feature = "cuda") {
            "the onnx runtime library offers no CUDA provider (install onnxruntime-gpu: `make setup` on a machine with an NVIDIA GPU, or point ORT_DYLIB_PATH at its libonnxruntime)"
        } else {
            "this binary was built without the `cuda` feature (`make build` on a machine with an NVIDIA GPU builds it with CUDA)"
        }
    };
    match (device, cuda_built) {
        (Device::Cpu, _) => Ok(Choice::Cpu),
        (Device::Cuda, true) => Ok(Choice::Cuda),
        (Device::Cuda, false) => Err(InferError::Model(format!(
            "infer.device = cuda, but {}",
            no_cuda()
        ))),
        (Device::Auto, true) if real => Ok(Choice::Cuda),
        (Device::Auto, true) => Ok(Choice::CudaElseCpu),
        (Device::Auto, false) if real => Err(InferError::Model(format!(
            "infer.device = auto found no usable CUDA for the real model profile `{profile}`: {}. \
             Refusing to run it on the CPU (hours per clip); set infer.device = cpu \
             (LIPSYNC_INFER__DEVICE=cpu) to do that on purpose",
            no_cuda()
        ))),
        (Device::Auto, false) => Ok(Choice::Cpu),
    }
}

/// What one worker runs on, for `/readyz`, metrics and task records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProviderInfo {
    /// `cpu`, `cuda` or `tensorrt`.
    pub provider: String,
    /// Device id (0 on the CPU).
    pub device_id: usize,
    /// Model profile.
    pub profile: String,
    /// Real weights (false: the random-weight test profile).
    pub real: bool,
    /// Precision of the UNet export (`fp32`, `fp16`; empty: unknown).
    pub precision: String,
    /// DeepCache interval (0: exact).
    pub deepcache_interval: u32,
}

impl ProviderInfo {
    /// `cpu`, or the provider and device, e.g. `cuda:0`.
    pub fn label(&self) -> String {
        if self.provider == "cpu" {
            "cpu".into()
        } else {
            format!("{}:{}", self.provider, self.device_id)
        }
    }

    /// The `/readyz` `device` object: `provider` (the label) and the model settings.
    pub fn device_json(&self) -> serde_json::Value {
        serde_json::json!({
            "provider": self.label(),
            "profile": self.profile,
            "real_weights": self.real,
            "precision": self.precision,
            "deepcache_interval": self.deepcache_interval,
        })
    }
}

static PROVIDER: OnceLock<ProviderInfo> = OnceLock::new();

/// Returns what the first worker of this process runs on (None before the models loaded).
/// The infer binary's `/readyz` reports it.
pub fn provider_info() -> Option<&'static ProviderInfo> {
    PROVIDER.get()
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

/// The sessions of one worker and the time spent inside them.
pub struct Engine {
    vae_encoder: Session,
    vae_decoder: Session,
    /// The plain UNet (None with DeepCache: its full-step graph holds the same weights).
    unet: Option<Session>,
    /// DeepCache full and shallow steps (when `deepcache_interval > 0`).
    deepcache: Option<(Session, Session)>,
    deepcache_interval: u32,
    /// One DDIM step on the provider: guidance mix, update, next UNet input.
    ddim_step: Session,
    /// Where the loop keeps its tensors between steps (the provider's device memory).
    device_memory: MemoryInfo<'static>,
    /// Execution provider in use (`cpu`, `cuda:<id>` or `tensorrt:<id>`).
    pub provider: String,
    /// The same, structured.
    pub info: ProviderInfo,
    busy: Duration,
    unet_busy: Duration,
    /// UNet runs since start-up (plain, full and shallow steps).
    pub unet_runs: u64,
    /// Time and runs of the DeepCache full and shallow steps.
    pub deepcache_stats: DeepCacheStats,
}

/// Time spent in each kind of DeepCache step.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeepCacheStats {
    /// Full steps run.
    pub full_runs: u64,
    /// Time inside full steps.
    pub full_busy: Duration,
    /// Shallow steps run.
    pub shallow_runs: u64,
    /// Time inside shallow steps.
    pub shallow_busy: Duration,
}

/// A cached deep feature `[B, C, F, h, w]` of the last full step.
#[derive(Debug, Clone)]
pub struct DeepFeature {
    /// Values.
    pub data: Vec<f32>,
    /// Shape.
    pub shape: [usize; 5],
}

impl Engine {
    /// Returns the sessions of `profile` for worker `device_id`.
    ///
    /// # Errors
    /// ONNX Runtime cannot be loaded, CUDA was required but is unavailable, or a model
    /// does not load.
    pub fn load(profile: &ResolvedProfile, opts: &EngineOptions, device_id: usize) -> Result<Self> {
        Self::load_with(profile, opts, &EngineExtras::default(), device_id)
    }

    /// [`Engine::load`] with DeepCache / TensorRT settings.
    ///
    /// # Errors
    /// As [`Engine::load`]; also a DeepCache interval without the DeepCache graphs.
    pub fn load_with(
        profile: &ResolvedProfile,
        opts: &EngineOptions,
        extras: &EngineExtras,
        device_id: usize,
    ) -> Result<Self> {
        let env = environment(opts.dylib.as_deref())?;
        let real = profile.profile.real;
        let choice = choose(opts.device, cuda_built(), real, &profile.name)?;
        if extras.deepcache_interval > 0 {
            require_deepcache(profile, extras)?;
        }
        let attempt = |gpu: bool| -> Result<Self> {
            let trt = gpu.then_some(()).and(extras.tensorrt_cache.as_deref());
            let open = |role: &str| -> Result<Session> {
                let path = profile
                    .model_path(role)
                    .ok_or_else(|| InferError::Model(format!("profile has no `{role}` model")))?;
                let builder = Session::builder(&env)?
                    .with_optimization_level(GraphOptimizationLevel::Level3)
                    .map_err(ort::Error::from)?;
                let builder = with_threads(builder, opts.intra_threads)?;
                let mut builder = with_provider(builder, gpu, trt, device_id)?;
                builder
                    .commit_from_file(&path)
                    .map_err(|e| InferError::Model(format!("cannot load the {role} model: {e}")))
            };
            let deepcache = if extras.deepcache_interval > 0 {
                Some((open(DEEPCACHE_ROLES[0])?, open(DEEPCACHE_ROLES[1])?))
            } else {
                None
            };
            let kind = match (gpu, trt.is_some()) {
                (false, _) => "cpu",
                (true, false) => "cuda",
                (true, true) => "tensorrt",
            };
            let info = ProviderInfo {
                provider: kind.to_owned(),
                device_id: if gpu { device_id } else { 0 },
                profile: profile.name.clone(),
                real,
                precision: unet_precision(profile),
                deepcache_interval: extras.deepcache_interval,
            };
            let device_memory = if gpu {
                MemoryInfo::new(
                    AllocationDevice::CUDA,
                    device_id as i32,
                    AllocatorType::Device,
                    MemoryType::Default,
                )?
            } else {
                host_memory()?
            };
            Ok(Self {
                ddim_step: open(DDIM_STEP_ROLE)?,
                device_memory,
                vae_encoder: open("vae_encoder")?,
                vae_decoder: open("vae_decoder")?,
                unet: if deepcache.is_none() {
                    Some(open("unet")?)
                } else {
                    None
                },
                deepcache,
                deepcache_interval: extras.deepcache_interval,
                provider: if gpu {
                    format!("{kind}:{device_id}")
                } else {
                    kind.to_owned()
                },
                info,
                busy: Duration::ZERO,
                unet_busy: Duration::ZERO,
                unet_runs: 0,
                deepcache_stats: DeepCacheStats::default(),
            })
        };
        let engine = match choice {
            Choice::Cpu => attempt(false)?,
            Choice::Cuda => attempt(true).map_err(|e| {
                InferError::Model(format!(
                    "the CUDA provider did not work ({e}); check `nvidia-smi`, the driver (CUDA 13 needs >= 580) and the onnxruntime-gpu runtime libraries"
                ))
            })?,
            Choice::CudaElseCpu => attempt(true).or_else(|e| {
                tracing::warn!(error = %e, profile = %profile.name, "CUDA did not work: the random-weight profile runs on the CPU");
                attempt(false)
            })?,
        };
        if engine.info.provider == "cpu" && real {
            tracing::warn!(
                profile = %profile.name,
                "infer.device = cpu with a real LatentSync profile: expect hours per clip (the GPU is not used)"
            );
        }
        if engine.info.provider != "cpu" && engine.info.precision == "fp32" {
            tracing::warn!(profile = %profile.name, "fp32 UNet on the GPU: `PRECISION=fp16 make models` is about twice as fast");
        }
        crate::metrics::set_provider(&engine.info);
        let _ = PROVIDER.set(engine.info.clone());
        Ok(engine)
    }

    /// Returns the DeepCache interval of this worker (0: exact).
    pub fn deepcache_interval(&self) -> u32 {
        self.deepcache_interval
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
    /// `[b*f, 50, 384]`; returns the noise prediction `[b, 4, f, h, w]`. One run with host
    /// tensors (copied in and out): the pipeline's loop is [`Engine::denoise`]; this and the
    /// DeepCache pair's [`Engine::unet_full`] / [`Engine::unet_shallow`] are for tests and
    /// tools (the host reference of that loop).
    pub fn unet(
        &mut self,
        sample: &[f32],
        shape: [usize; 5],
        t: i64,
        audio: &[f32],
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let timestep = [t];
        let (sample, timestep, audio) = unet_inputs(sample, shape, &timestep, audio)?;
        let Some(unet) = self.unet.as_mut() else {
            return Err(InferError::Model(
                "the plain UNet is not loaded (DeepCache is on)".into(),
            ));
        };
        let out = unet.run(ort::inputs![
            "sample" => sample,
            "timestep" => timestep,
            "encoder_hidden_states" => audio,
        ])?;
        let (_, eps) = out["noise_pred"].try_extract_tensor::<f32>()?;
        let res = eps.to_vec();
        drop(out);
        self.account(start.elapsed());
        Ok(res)
    }
}

impl Engine {
    /// DeepCache full step: as [`Engine::unet`], plus the deep feature to cache.
    ///
    /// # Errors
    /// No DeepCache graphs loaded, or a failed run.
    pub fn unet_full(
        &mut self,
        sample: &[f32],
        shape: [usize; 5],
        t: i64,
        audio: &[f32],
    ) -> Result<(Vec<f32>, DeepFeature)> {
        let start = Instant::now();
        let Some((full, _)) = self.deepcache.as_mut() else {
            return Err(InferError::Model("DeepCache graphs not loaded".into()));
        };
        let timestep = [t];
        let (sample, timestep, audio) = unet_inputs(sample, shape, &timestep, audio)?;
        let out = full.run(ort::inputs![
            "sample" => sample,
            "timestep" => timestep,
            "encoder_hidden_states" => audio,
        ])?;
        let (_, eps) = out["noise_pred"].try_extract_tensor::<f32>()?;
        let (dshape, deep) = out["deep_feature"].try_extract_tensor::<f32>()?;
        let dims: Vec<usize> = dshape.iter().map(|&d| d as usize).collect();
        let deep_shape: [usize; 5] = dims
            .try_into()
            .map_err(|_| InferError::Model("deep_feature is not 5-D".into()))?;
        let res = (
            eps.to_vec(),
            DeepFeature {
                data: deep.to_vec(),
                shape: deep_shape,
            },
        );
        drop(out);
        let spent = start.elapsed();
        self.account(spent);
        self.deepcache_stats.full_runs += 1;
        self.deepcache_stats.full_busy += spent;
        Ok(res)
    }

    /// DeepCache shallow step: the noise prediction from `sample` and the cached `deep`.
    ///
    /// # Errors
    /// No DeepCache graphs loaded, or a failed run.
    pub fn unet_shallow(
        &mut self,
        sample: &[f32],
        shape: [usize; 5],
        t: i64,
        audio: &[f32],
        deep: &DeepFeature,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let Some((_, shallow)) = self.deepcache.as_mut() else {
            return Err(InferError::Model("DeepCache graphs not loaded".into()));
        };
        let timestep = [t];
        let (sample, timestep, audio) = unet_inputs(sample, shape, &timestep, audio)?;
        let cached = TensorRef::from_array_view((deep.shape, &deep.data[..]))?;
        let out = shallow.run(ort::inputs![
            "sample" => sample,
            "timestep" => timestep,
            "encoder_hidden_states" => audio,
            "deep_feature" => cached,
        ])?;
        let (_, eps) = out["noise_pred"].try_extract_tensor::<f32>()?;
        let res = eps.to_vec();
        drop(out);
        let spent = start.elapsed();
        self.account(spent);
        self.deepcache_stats.shallow_runs += 1;
        self.deepcache_stats.shallow_busy += spent;
        Ok(res)
    }

    /// Runs the DDIM loop of one chunk on the provider and returns the final latents
    /// `[4, f, h, w]` of batch item 0.
    ///
    /// `sample` is the first UNet input `[b, 13, f, h, w]` (`b` = 2 with CFG: batch item 0
    /// unconditional, 1 conditional) and `audio` the audio embeds `[b*f, tokens, 384]`
    /// (all-zero rows for the unconditional item). Both go to the device once (the sample to
    /// the UNet and to the step graph, the audio to each UNet graph of the chunk). Every
    /// step then runs on bound values: the UNet graph of the step (plain, or the DeepCache
    /// full / shallow graph with its cached deep feature) writes the noise prediction to
    /// device memory, and the `ddim_step` graph turns it and the current UNet input into the
    /// next UNet input there (guidance mix with `guidance`, the update with
    /// [`Ddim::coefficients`]). Per step only the timestep and the two coefficients (24
    /// bytes) go up; the last step writes the latents to host memory. `kinds` receives one
    /// letter per step (`E` exact, `F` full, `S` shallow); `after_step(i)` returning false
    /// stops the loop with [`InferError::Stopped`]. `observe(i, latents)`, when given, sees
    /// the latents `[4, f, h, w]` after every step; it brings each step's output to the host,
    /// so it is meant for comparisons (`make parity`), never for serving.
    ///
    /// # Errors
    /// A failed model run, a missing graph, or a stop.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &mut self,
        ddim: &Ddim,
        sample: Vec<f32>,
        shape: [usize; 5],
        audio: Vec<f32>,
        guidance: f32,
        kinds: &mut String,
        after_step: &mut dyn FnMut(usize) -> bool,
        mut observe: Option<StepObserver<'_>>,
    ) -> Result<Vec<f32>> {
        let [b, _, f, h, w] = shape;
        let tokens = audio.len() / (b * f * 384).max(1);
        let sample = Tensor::from_array((shape, sample))?.into_dyn();
        let audio = Tensor::from_array(([b * f, tokens, 384], audio))?;
        let interval = self.deepcache_interval;
        // One binding per graph of the chunk: the audio is bound (uploaded) once per graph.
        let mut plain = match (&self.unet, interval) {
            (Some(unet), 0) => Some(unet.create_binding()?),
            (None, 0) => {
                return Err(InferError::Model(
                    "the plain UNet is not loaded (DeepCache is on)".into(),
                ));
            }
            _ => None,
        };
        let (mut full, mut shallow) = match (&self.deepcache, interval) {
            (_, 0) => (None, None),
            (Some((fs, ss)), _) => (Some(fs.create_binding()?), Some(ss.create_binding()?)),
            (None, _) => return Err(InferError::Model("DeepCache graphs not loaded".into())),
        };
        for binding in [&mut plain, &mut full, &mut shallow].into_iter().flatten() {
            binding.bind_input("encoder_hidden_states", &audio)?;
        }
        let mut step = self.ddim_step.create_binding()?;
        step.bind_input("guidance", &scalar(guidance)?)?;
        let host = host_memory()?;
        let steps = ddim.timesteps().len();
        let mut current: DynValue = sample;
        let mut deep: Option<DynValue> = None;
        for (i, &t) in ddim.timesteps().iter().enumerate() {
            let kind = match deep {
                _ if interval == 0 => 'E',
                Some(_) if !deepcache_full_step(interval, i) => 'S',
                _ => 'F',
            };
            kinds.push(kind);
            let binding = match kind {
                'E' => plain.as_mut(),
                'F' => full.as_mut(),
                _ => shallow.as_mut(),
            }
            .expect("binding of the step's graph");
            binding.bind_input("sample", &current)?;
            binding.bind_input("timestep", &scalar(t)?)?;
            // Bound afresh every run: the output goes into a new buffer, so the values of
            // the previous run stay valid while they are still read.
            binding.bind_output_to_device("noise_pred", &self.device_memory)?;
            match kind {
                'F' => binding.bind_output_to_device("deep_feature", &self.device_memory)?,
                'S' => binding.bind_input(
                    "deep_feature",
                    deep.as_ref().expect("a full step came first"),
                )?,
                _ => {}
            }
            let start = Instant::now();
            let (eps, new_deep) = self.run_unet(kind, binding)?;
            let spent = start.elapsed();
            self.account(spent);
            match kind {
                'F' => {
                    deep = new_deep;
                    self.deepcache_stats.full_runs += 1;
                    self.deepcache_stats.full_busy += spent;
                }
                'S' => {
                    self.deepcache_stats.shallow_runs += 1;
                    self.deepcache_stats.shallow_busy += spent;
                }
                _ => {}
            }

            let (c_sample, c_eps) = ddim.coefficients(i);
            step.bind_input("noise_pred", &eps)?;
            step.bind_input("sample", &current)?;
            step.bind_input("c_sample", &scalar(c_sample)?)?;
            step.bind_input("c_eps", &scalar(c_eps)?)?;
            step.clear_outputs();
            let last = i + 1 == steps;
            if last {
                step.bind_output_to_device("latents", &host)?;
            } else if observe.is_some() {
                // Observed (comparisons only): every step's output comes to the host.
                step.bind_output_to_device("next_sample", &host)?;
            } else {
                step.bind_output_to_device("next_sample", &self.device_memory)?;
            }
            let start = Instant::now();
            let mut out = self.ddim_step.run_binding(&step)?;
            let next = out
                .remove(if last { "latents" } else { "next_sample" })
                .ok_or_else(|| InferError::Model("ddim_step gave no output".into()))?;
            drop(out);
            self.busy += start.elapsed();
            if let Some(observe) = observe.as_mut() {
                // Batch item 0's first four channels: the latents `[4, f, h, w]`.
                let (_, values) = next.try_extract_tensor::<f32>()?;
                observe(i, &values[..4 * f * h * w]);
            }
            if !after_step(i) {
                return Err(InferError::Stopped);
            }
            if last {
                let (_, latents) = next.try_extract_tensor::<f32>()?;
                return Ok(latents.to_vec());
            }
            current = next;
        }
        Err(InferError::Model("no DDIM steps".into()))
    }

    /// One bound UNet run of `kind` (`E`, `F`, `S`): the noise prediction and, for a full
    /// step, the deep feature.
    fn run_unet(
        &mut self,
        kind: char,
        binding: &IoBinding,
    ) -> Result<(DynValue, Option<DynValue>)> {
        let session = match kind {
            'E' => self.unet.as_mut(),
            'F' => self.deepcache.as_mut().map(|(f, _)| f),
            _ => self.deepcache.as_mut().map(|(_, s)| s),
        }
        .ok_or_else(|| InferError::Model("UNet graph not loaded".into()))?;
        let mut out = session.run_binding(binding)?;
        let eps = out
            .remove("noise_pred")
            .ok_or_else(|| InferError::Model("the UNet gave no noise_pred".into()))?;
        let deep =
            if kind == 'F' {
                Some(out.remove("deep_feature").ok_or_else(|| {
                    InferError::Model("the full step gave no deep_feature".into())
                })?)
            } else {
                None
            };
        Ok((eps, deep))
    }

    fn account(&mut self, spent: Duration) {
        self.busy += spent;
        self.unet_busy += spent;
        self.unet_runs += 1;
    }
}

/// Sees the latents `[4, f, h, w]` after DDIM step `i` (see [`Engine::denoise`]).
pub type StepObserver<'a> = &'a mut dyn FnMut(usize, &[f32]);

/// Host memory, for values the host reads.
fn host_memory() -> Result<MemoryInfo<'static>> {
    Ok(MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )?)
}

/// A `[1]` tensor holding `v`.
fn scalar<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
    v: T,
) -> Result<Tensor<T>> {
    Ok(Tensor::from_array(([1usize], vec![v]))?)
}

/// The inputs of every UNet graph: `sample` `[b, 13, f, h, w]`, the `timestep` and the
/// audio embeds `[b*f, tokens, 384]`.
fn unet_inputs<'a>(
    sample: &'a [f32],
    shape: [usize; 5],
    timestep: &'a [i64; 1],
    audio: &'a [f32],
) -> Result<(TensorRef<'a, f32>, TensorRef<'a, i64>, TensorRef<'a, f32>)> {
    let [b, _, f, _, _] = shape;
    let sample = TensorRef::from_array_view((shape, sample))?;
    let timestep = TensorRef::from_array_view(([1usize], &timestep[..]))?;
    let tokens = audio.len() / (b * f * 384).max(1);
    let audio = TensorRef::from_array_view(([b * f, tokens, 384], audio))?;
    Ok((sample, timestep, audio))
}

/// Checks that the profile has the DeepCache graphs (and their lock entries).
fn require_deepcache(profile: &ResolvedProfile, extras: &EngineExtras) -> Result<()> {
    let missing: Vec<&str> = DEEPCACHE_ROLES
        .iter()
        .copied()
        .filter(|r| profile.model_path(r).is_none_or(|p| !p.exists()))
        .collect();
    if !missing.is_empty() {
        return Err(InferError::Model(format!(
            "infer.deepcache_interval = {} needs the DeepCache graphs ({}) in {}: re-run `make models` (or `make setup` for tiny), or set infer.deepcache_interval = 0",
            extras.deepcache_interval,
            missing.join(", "),
            profile.dir.display()
        )));
    }
    if let Some(manifest) = &extras.manifest {
        lipsync_runtime::models::verify(manifest, &profile.name, &DEEPCACHE_ROLES)
            .map_err(|e| InferError::Model(format!("DeepCache graphs: {e}")))?;
    }
    Ok(())
}

/// The `precision` the exporter wrote into the profile's lock file (`fp32` when absent:
/// the tiny generator only writes fp32).
fn unet_precision(profile: &ResolvedProfile) -> String {
    let lock = profile
        .profile
        .lock_file
        .as_deref()
        .and_then(|l| std::fs::read_to_string(profile.dir.join(l)).ok())
        .unwrap_or_default();
    lock.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "precision").then(|| v.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "fp32".to_owned())
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
fn cuda_built() -> bool {
    use ort::ep::ExecutionProvider;
    ort::ep::CUDA::is_available().unwrap_or(false)
}

#[cfg(not(feature = "cuda"))]
fn cuda_built() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn with_provider(
    builder: SessionBuilder,
    cuda: bool,
    tensorrt_cache: Option<&Path>,
    device_id: usize,
) -> Result<SessionBuilder> {
    if !cuda {
        return Ok(builder);
    }
    let mut eps = Vec::new();
    if let Some(cache) = tensorrt_cache {
        eps.push(tensorrt(cache, device_id)?);
    }
    eps.push(
        ort::ep::CUDA::default()
            .with_device_id(device_id as i32)
            .build()
            .error_on_failure(),
    );
    Ok(builder
        .with_execution_providers(eps)
        .map_err(ort::Error::from)?)
}

#[cfg(feature = "tensorrt")]
fn tensorrt(cache: &Path, device_id: usize) -> Result<ort::ep::ExecutionProviderDispatch> {
    std::fs::create_dir_all(cache).map_err(|e| {
        InferError::Model(format!("tensorrt engine cache {}: {e}", cache.display()))
    })?;
    Ok(ort::ep::TensorRT::default()
        .with_device_id(device_id as i32)
        .with_fp16(true)
        .with_engine_cache(true)
        .with_engine_cache_path(cache.display())
        .with_timing_cache(true)
        .with_timing_cache_path(cache.display())
        .build()
        .error_on_failure())
}

#[cfg(all(feature = "cuda", not(feature = "tensorrt")))]
fn tensorrt(_cache: &Path, _device_id: usize) -> Result<ort::ep::ExecutionProviderDispatch> {
    Err(InferError::Model(
        "infer.tensorrt = true but this binary was built without the `tensorrt` feature".into(),
    ))
}

#[cfg(not(feature = "cuda"))]
fn with_provider(
    builder: SessionBuilder,
    _cuda: bool,
    _tensorrt_cache: Option<&Path>,
    _device_id: usize,
) -> Result<SessionBuilder> {
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_without_cuda_refuses_a_real_profile() {
        let err = choose(Device::Auto, false, true, "latentsync-1.6").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("infer.device = cpu"), "{msg}");
        assert!(msg.contains("latentsync-1.6"), "{msg}");
    }

    #[test]
    fn explicit_cpu_runs_anything_on_the_cpu() {
        for (cuda, real) in [(false, true), (true, true), (false, false), (true, false)] {
            assert_eq!(choose(Device::Cpu, cuda, real, "p").unwrap(), Choice::Cpu);
        }
    }

    #[test]
    fn tiny_falls_back_real_does_not() {
        assert_eq!(
            choose(Device::Auto, false, false, "tiny").unwrap(),
            Choice::Cpu
        );
        assert_eq!(
            choose(Device::Auto, true, false, "tiny").unwrap(),
            Choice::CudaElseCpu
        );
        assert_eq!(
            choose(Device::Auto, true, true, "latentsync-1.5").unwrap(),
            Choice::Cuda
        );
        assert!(choose(Device::Cuda, false, false, "tiny").is_err());
        assert_eq!(
            choose(Device::Cuda, true, false, "tiny").unwrap(),
            Choice::Cuda
        );
    }
}
