//! The profile's keep-mask (docs/architecture.md §9.4): 255 = keep the original pixel, 0 =
//! generate. Read once at start-up, resized to the model resolution (Lanczos, like the
//! reference's LANCZOS4) and to the latent size (nearest, like `F.interpolate`).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{InferError, Result};
use crate::image::{resize_lanczos, resize_nearest};

/// The keep-mask at `R x R` (values in [0, 1]) and at the latent size `R/8 x R/8`.
#[derive(Debug, Clone)]
pub struct Mask {
    resolution: usize,
    pixels: Vec<f32>,
    latent: Vec<f32>,
}

impl Mask {
    /// Builds the mask from 8-bit grey values of size `size x size`.
    pub fn from_grey(grey: &[u8], size: usize, resolution: usize) -> Self {
        let grey = if size == resolution {
            grey.to_vec()
        } else {
            resize_lanczos(grey, size, size, 1, resolution, resolution)
        };
        let pixels: Vec<f32> = grey.iter().map(|&v| f32::from(v) / 255.0).collect();
        let l = resolution / 8;
        let latent = resize_nearest(&pixels, resolution, resolution, l, l);
        Self {
            resolution,
            pixels,
            latent,
        }
    }

    /// Reads a mask image (any format ffmpeg reads; the first channel's grey level). The
    /// mask is a model file checked against the manifest's sha256, not user media, so it
    /// is read with a plain ffmpeg run: the media wrapper's format whitelist (containers
    /// only) would refuse an image.
    ///
    /// # Errors
    /// ffmpeg cannot decode it or its size differs from `size`.
    pub fn load(path: &Path, size: usize, resolution: usize) -> Result<Self> {
        let out = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(path)
            .args([
                "-frames:v",
                "1",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "gray",
                "pipe:1",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| InferError::Model(format!("cannot run ffmpeg to read the mask: {e}")))?;
        if !out.status.success() || out.stdout.len() != size * size {
            return Err(InferError::Model(format!(
                "mask image is not a {size}x{size} image ({} bytes decoded)",
                out.stdout.len()
            )));
        }
        Ok(Self::from_grey(&out.stdout, size, resolution))
    }

    /// Returns the `R x R` keep weights.
    pub fn pixels(&self) -> &[f32] {
        &self.pixels
    }

    /// Returns the `R/8 x R/8` keep weights of the UNet's mask channel.
    pub fn latent(&self) -> &[f32] {
        &self.latent
    }

    /// Returns `R`.
    pub fn resolution(&self) -> usize {
        self.resolution
    }
}
