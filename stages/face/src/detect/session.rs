//! ONNX Runtime sessions: one process-wide environment, execution-provider choice.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::error::{FaceError, Result};

/// Execution provider choice (`face.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when available in this build and library, else CPU.
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA or fail.
    Cuda,
}

impl Device {
    /// Parses `auto`, `cpu` or `cuda`.
    ///
    /// # Errors
    /// [`FaceError::Config`] for any other value.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(FaceError::Config(format!(
                "face.device: `{other}` is not one of auto, cpu, cuda"
            ))),
        }
    }
}

/// How sessions are created.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Execution provider.
    pub device: Device,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub intra_threads: usize,
    /// ONNX Runtime library (none: `ORT_DYLIB_PATH`).
    pub library: Option<PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            intra_threads: 0,
            library: None,
        }
    }
}

static ENV: OnceLock<Mutex<Option<Environment>>> = OnceLock::new();

/// Returns the process-wide ONNX Runtime environment, creating it on first use (ort
/// allows one per process).
fn environment(library: Option<&Path>) -> Result<Environment> {
    let cell = ENV.get_or_init(|| Mutex::new(None));
    let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = guard.as_ref() {
        return Ok(env.clone());
    }
    let builder = match library {
        Some(path) => ort::init_from(path)
            .map_err(|e| FaceError::Model(format!("cannot load ONNX Runtime library: {e}")))?,
        None => ort::init(),
    };
    // ort panics when the library cannot be loaded; turn that into an error that says
    // what to do.
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        builder.with_name("lipsync-face").build()
    }))
    .map_err(|_| {
        FaceError::Model(
            "cannot load the ONNX Runtime library: set ORT_DYLIB_PATH (`. .local/env.sh` after `make setup`) or face.ort_dylib_path".into(),
        )
    })?;
    let env = built.map_err(|e| FaceError::Model(format!("cannot start ONNX Runtime: {e}")))?;
    *guard = Some(env.clone());
    Ok(env)
}

/// Loads `model` into a session with `opts`.
///
/// # Errors
/// [`FaceError::Model`] when the file is missing or ONNX Runtime rejects it.
pub fn load(model: &Path, opts: &SessionOptions) -> Result<Session> {
    if !model.is_file() {
        return Err(FaceError::Model(format!(
            "{} is missing (run `make setup`)",
            model
                .file_name()
                .map_or_else(|| "model file".into(), |n| n.to_string_lossy().into_owned())
        )));
    }
    let env = environment(opts.library.as_deref())?;
    let err = |e: String| FaceError::Model(e);
    let mut builder = Session::builder(&env)
        .map_err(|e| err(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| err(e.to_string()))?;
    if opts.intra_threads > 0 {
        builder = builder
            .with_intra_threads(opts.intra_threads)
            .map_err(|e| err(e.to_string()))?;
    }
    builder = with_device(builder, opts.device)?;
    builder.commit_from_file(model).map_err(|e| {
        err(format!(
            "{}: {e}",
            model.file_name().unwrap_or_default().to_string_lossy()
        ))
    })
}

#[cfg(feature = "cuda")]
fn with_device(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<ort::session::builder::SessionBuilder> {
    let ep = match device {
        Device::Cpu => return Ok(builder),
        Device::Auto => ort::ep::CUDA::default().build(),
        Device::Cuda => ort::ep::CUDA::default().build().error_on_failure(),
    };
    builder
        .with_execution_providers([ep])
        .map_err(|e| FaceError::Model(format!("CUDA execution provider: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn with_device(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<ort::session::builder::SessionBuilder> {
    if device == Device::Cuda {
        return Err(FaceError::Config(
            "face.device = \"cuda\" needs a build with the `cuda` feature".into(),
        ));
    }
    Ok(builder)
}

/// Copies output `index` of `outputs` as `(shape, data)`.
///
/// # Errors
/// [`FaceError::Inference`] when the output is missing or not f32.
pub fn output_f32(
    outputs: &ort::session::SessionOutputs<'_>,
    index: usize,
) -> Result<(Vec<i64>, Vec<f32>)> {
    if index >= outputs.len() {
        return Err(FaceError::Inference(format!("model has no output {index}")));
    }
    let (shape, data) = outputs[index]
        .try_extract_tensor::<f32>()
        .map_err(|e| FaceError::Inference(e.to_string()))?;
    Ok((shape.iter().copied().collect(), data.to_vec()))
}
