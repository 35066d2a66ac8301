//! The Whisper encoder through ONNX Runtime: `mel [1,80,3000] -> hidden_states
//! [1,5,1500,384]` (the `whisper_encoder` role of the model manifest).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::TensorRef;

use crate::error::{Error, Result};
use crate::mel::N_MELS;
use crate::windows::{DIM, LAYERS, WINDOW_FRAMES, WINDOW_POSITIONS, WindowEncoder};

/// Which execution provider runs the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when built with the `cuda` feature and available, else CPU.
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA or refuse to start.
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(Error::Config(format!(
                "audio.device must be auto, cpu or cuda, not `{other}`"
            ))),
        }
    }
}

/// Session options.
#[derive(Debug, Clone)]
pub struct EncoderOptions {
    /// Execution provider.
    pub device: Device,
    /// Intra-op threads (0: ONNX Runtime's choice).
    pub intra_threads: usize,
    /// ONNX Runtime library (None: `ORT_DYLIB_PATH`).
    pub dylib: Option<PathBuf>,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self {
            device: Device::Auto,
            intra_threads: 0,
            dylib: None,
        }
    }
}

/// ONNX Runtime allows one environment per process, created once and never dropped.
static ENVIRONMENT: OnceLock<std::result::Result<ort::environment::Environment, String>> =
    OnceLock::new();

fn environment(dylib: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let builder = match dylib {
                Some(p) => ort::init_from(p).map_err(|e| e.to_string())?,
                None => {
                    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
                        return Err(
                            "ONNX Runtime library not configured (set ORT_DYLIB_PATH or audio.ort-dylib-path; `make setup` writes it to .local/env.sh)".to_owned(),
                        );
                    }
                    ort::init()
                }
            };
            builder
                .with_name("lipsync-audio")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Model(e.clone()))
}

/// The encoder session (one per worker; `run` needs `&mut`).
pub struct OrtEncoder {
    session: Session,
    provider: &'static str,
}

impl OrtEncoder {
    /// Loads the model and checks its input and output names.
    ///
    /// # Errors
    /// [`Error::Model`] when ONNX Runtime or the model cannot be loaded, the contract
    /// differs, or CUDA was required and is unavailable.
    pub fn load(path: &Path, opts: &EncoderOptions) -> Result<Self> {
        let env = environment(opts.dylib.as_deref())?;
        let model_err = |e: ort::Error| Error::Model(e.to_string());
        let mut builder = Session::builder(env).map_err(model_err)?;
        if opts.intra_threads > 0 {
            builder = builder
                .with_intra_threads(opts.intra_threads)
                .map_err(|e| Error::Model(e.to_string()))?;
        }
        let (mut builder, provider) = register_provider(builder, opts.device)?;
        let session = builder
            .commit_from_file(path)
            .map_err(|e| Error::Model(format!("whisper encoder: {e}")))?;
        let input_ok = session.inputs().iter().any(|i| i.name() == "mel");
        let output_ok = session
            .outputs()
            .iter()
            .any(|o| o.name() == "hidden_states");
        if !input_ok || !output_ok {
            return Err(Error::Model(
                "whisper encoder: expected input `mel` and output `hidden_states`".into(),
            ));
        }
        Ok(Self { session, provider })
    }

    /// The execution provider in use (`cpu` or `cuda`).
    pub fn provider(&self) -> &'static str {
        self.provider
    }
}

#[cfg(feature = "cuda")]
fn register_provider(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<(ort::session::builder::SessionBuilder, &'static str)> {
    use ort::ep::ExecutionProvider;
    if device == Device::Cpu {
        return Ok((builder, "cpu"));
    }
    let cuda = ort::ep::CUDA::default();
    let mut builder = builder;
    match cuda.register(&mut builder) {
        Ok(()) => Ok((builder, "cuda")),
        Err(e) if device == Device::Cuda => Err(Error::Model(format!("cuda unavailable: {e}"))),
        Err(e) => {
            tracing::warn!(error = %e, "cuda unavailable, the audio encoder runs on the cpu");
            Ok((builder, "cpu"))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn register_provider(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<(ort::session::builder::SessionBuilder, &'static str)> {
    if device == Device::Cuda {
        return Err(Error::Model(
            "audio.device = cuda, but this binary was built without the `cuda` feature".into(),
        ));
    }
    Ok((builder, "cpu"))
}

impl WindowEncoder for OrtEncoder {
    fn encode(&mut self, mel: &[f32]) -> Result<Vec<f32>> {
        let expected = N_MELS * WINDOW_FRAMES;
        if mel.len() != expected {
            return Err(Error::Inference(format!(
                "window has {} values, expected {expected}",
                mel.len()
            )));
        }
        let input = TensorRef::from_array_view(([1usize, N_MELS, WINDOW_FRAMES], mel))
            .map_err(|e| Error::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs!["mel" => input])
            .map_err(|e| Error::Inference(e.to_string()))?;
        let (shape, data) = outputs["hidden_states"]
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::Inference(e.to_string()))?;
        let want = [1i64, LAYERS as i64, WINDOW_POSITIONS as i64, DIM as i64];
        if shape[..] != want[..] {
            return Err(Error::Inference(format!(
                "hidden_states has shape {shape:?}, expected {want:?}"
            )));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::Inference("hidden_states is not finite".into()));
        }
        Ok(data.to_vec())
    }
}
