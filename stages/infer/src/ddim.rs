//! The DDIM scheduler of the reference (`configs/scheduler_config.json`, diffusers
//! `DDIMScheduler`): scaled-linear betas, leading timestep spacing with an offset,
//! deterministic updates (eta 0) of an epsilon-predicting model, and the classifier-free
//! guidance combination.
//!
//! The pipeline runs the update and the guidance mix on the execution provider, in the
//! profile's `ddim_step` graph, with the per-step coefficients of [`Ddim::coefficients`]
//! (see `Engine::denoise`). [`Ddim::step`] and [`guide`] are the same arithmetic on the
//! host, in the same order: the reference the tests hold the graph to.

use lipsync_runtime::models::SchedulerSpec;

use crate::error::InferError;

/// A DDIM schedule for a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    /// Cumulative alpha products of the training schedule (`alphas_cumprod`), f64.
    alphas_cumprod: Vec<f64>,
    /// Alpha product used after the last step (`alphas_cumprod[0]`, or 1 with
    /// `set_alpha_to_one`).
    final_alpha: f64,
    /// Timesteps in run order (e.g. 951, 901, ..., 1 for 20 steps).
    timesteps: Vec<i64>,
    /// Distance between consecutive timesteps (`train_steps / steps`).
    step_ratio: i64,
}

impl Ddim {
    /// Returns the schedule of `spec` for `steps` inference steps.
    ///
    /// # Errors
    /// A schedule this port does not implement (only `scaled_linear` / `linear` betas,
    /// `leading` spacing and eta 0), or `steps` outside `1..=num_train_timesteps`.
    pub fn new(spec: &SchedulerSpec, steps: u32) -> Result<Self, InferError> {
        let train = spec.num_train_timesteps as usize;
        if train == 0 || steps == 0 || steps as usize > train {
            return Err(InferError::BadRequest(format!(
                "inference_steps must be between 1 and {train}"
            )));
        }
        if !(spec.timestep_spacing.is_empty() || spec.timestep_spacing == "leading") {
            return Err(InferError::Model(format!(
                "unsupported timestep spacing `{}`",
                spec.timestep_spacing
            )));
        }
        if spec.eta != 0.0 {
            return Err(InferError::Model("only eta = 0 is implemented".into()));
        }
        let betas = betas(spec)?;
        let mut alphas_cumprod = Vec::with_capacity(train);
        let mut acc = 1.0f64;
        for b in betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let final_alpha = if spec.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let step_ratio = (train / steps as usize) as i64;
        let timesteps = (0..steps as i64)
            .rev()
            .map(|i| i * step_ratio + i64::from(spec.steps_offset))
            .collect::<Vec<i64>>();
        if timesteps.first().is_some_and(|&t| t >= train as i64) {
            return Err(InferError::BadRequest(format!(
                "inference_steps must be at most {} for this scheduler",
                (train as i64 - i64::from(spec.steps_offset)).max(1)
            )));
        }
        Ok(Self {
            alphas_cumprod,
            final_alpha,
            timesteps,
            step_ratio,
        })
    }

    /// Returns the timesteps in the order they run.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// Returns the cumulative alpha product at training timestep `t`.
    pub fn alpha_cumprod(&self, t: i64) -> f64 {
        self.alphas_cumprod[t as usize]
    }

    /// Returns `(alpha_t, alpha_prev)` for step `i` of the run.
    pub fn alphas(&self, i: usize) -> (f64, f64) {
        let t = self.timesteps[i];
        let prev = t - self.step_ratio;
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha
        };
        (self.alphas_cumprod[t as usize], alpha_prev)
    }

    /// Returns `(c_sample, c_eps)` of step `i`: the deterministic DDIM update (eta 0,
    /// epsilon prediction, no clipping) is `x_prev = c_sample * x + c_eps * eps`, from
    /// `x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)` and
    /// `x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps`; the last step's `a_prev` is the final
    /// alpha (`alphas_cumprod[0]`, or 1 with `set_alpha_to_one`).
    pub fn coefficients(&self, i: usize) -> (f64, f64) {
        let (a_t, a_prev) = self.alphas(i);
        let c_x = (a_prev / a_t).sqrt();
        let c_eps = (1.0 - a_prev).sqrt() - (a_prev * (1.0 - a_t) / a_t).sqrt();
        (c_x, c_eps)
    }

    /// One deterministic DDIM update of `sample` in place, given the model's `eps` at step
    /// `i`, on the host (f64 arithmetic, rounded to f32): the reference of the `ddim_step`
    /// graph, which the pipeline runs instead.
    pub fn step(&self, i: usize, eps: &[f32], sample: &mut [f32]) {
        let (c_x, c_eps) = self.coefficients(i);
        for (x, &e) in sample.iter_mut().zip(eps) {
            *x = (c_x * f64::from(*x) + c_eps * f64::from(e)) as f32;
        }
    }
}

/// Classifier-free guidance: `eps_u + g (eps_c - eps_u)`, written into `uncond` (f32, the
/// order of the `ddim_step` graph: difference, product, sum); the host reference of the
/// graph's mix.
pub fn guide(uncond: &mut [f32], cond: &[f32], guidance: f32) {
    for (u, &c) in uncond.iter_mut().zip(cond) {
        *u += guidance * (c - *u);
    }
}

fn betas(spec: &SchedulerSpec) -> Result<Vec<f64>, InferError> {
    let n = spec.num_train_timesteps as usize;
    let lin = |a: f64, b: f64| -> Vec<f64> {
        if n == 1 {
            return vec![a];
        }
        (0..n)
            .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
            .collect()
    };
    match spec.beta_schedule.as_str() {
        "scaled_linear" => Ok(lin(spec.beta_start.sqrt(), spec.beta_end.sqrt())
            .into_iter()
            .map(|x| x * x)
            .collect()),
        "linear" => Ok(lin(spec.beta_start, spec.beta_end)),
        other => Err(InferError::Model(format!(
            "unsupported beta schedule `{other}`"
        ))),
    }
}

/// Whether DDIM step `i` (0-based, within one chunk) runs the full UNet under DeepCache with
/// `interval` (0: DeepCache off, every step exact). The reference's helper
/// (`DeepCacheSDHelper`, uniform mode) runs the full model when
/// `(step index - first step index seen) % interval == 0`; its first step index is 0 and the
/// index restarts with every chunk's scheduler loop, so that is `i % interval == 0`.
pub fn deepcache_full_step(interval: u32, i: usize) -> bool {
    interval == 0 || i.is_multiple_of(interval as usize)
}

/// Returns the `[start, end)` output-frame ranges of the chunks of `n` frames,
/// `per_chunk` each (the last one shorter).
pub fn chunk_ranges(n: usize, per_chunk: usize) -> Vec<std::ops::Range<usize>> {
    let per_chunk = per_chunk.max(1);
    (0..n.div_ceil(per_chunk))
        .map(|c| c * per_chunk..((c + 1) * per_chunk).min(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SchedulerSpec {
        SchedulerSpec {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            timestep_spacing: "leading".into(),
            set_alpha_to_one: false,
            eta: 0.0,
        }
    }

    /// The alpha product computed independently: exp(sum(log(1 - beta_i))) with
    /// beta_i = (sqrt(b0) + i/999 (sqrt(b1) - sqrt(b0)))^2.
    fn independent_alpha(t: usize) -> f64 {
        let (s0, s1) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        (0..=t)
            .map(|i| {
                let s = s0 + (s1 - s0) * (i as f64) / 999.0;
                (1.0 - s * s).ln()
            })
            .sum::<f64>()
            .exp()
    }

    #[test]
    fn timesteps_are_leading_with_offset() {
        let d = Ddim::new(&spec(), 20).unwrap();
        let want: Vec<i64> = (0..20).rev().map(|i| 50 * i + 1).collect();
        assert_eq!(d.timesteps(), want.as_slice());
        assert_eq!(d.timesteps()[0], 951);
        assert_eq!(*d.timesteps().last().unwrap(), 1);
        let d = Ddim::new(&spec(), 50).unwrap();
        assert_eq!(&d.timesteps()[..3], &[981, 961, 941]);
        let d = Ddim::new(&spec(), 1).unwrap();
        assert_eq!(d.timesteps(), &[1]);
        assert!(Ddim::new(&spec(), 0).is_err());
        assert!(Ddim::new(&spec(), 1001).is_err());
        // 1000 steps with offset 1 would start at t = 1000, past the schedule.
        assert!(Ddim::new(&spec(), 1000).is_err());
        assert_eq!(Ddim::new(&spec(), 999).unwrap().timesteps()[0], 999);
    }

    #[test]
    fn alpha_products_match_an_independent_computation() {
        let d = Ddim::new(&spec(), 20).unwrap();
        for t in [0usize, 1, 51, 500, 951, 999] {
            let want = independent_alpha(t);
            let got = d.alpha_cumprod(t as i64);
            assert!((got - want).abs() < 1e-12, "t={t}: {got} vs {want}");
        }
        // Well-known values of the Stable Diffusion schedule.
        assert!((d.alpha_cumprod(0) - 0.99915).abs() < 1e-6);
        assert!((d.alpha_cumprod(999) - 0.004_660_1).abs() < 1e-5);
        // First step: alpha at 951, previous 901; last step: 1 -> final alpha = ac[0].
        let (a, p) = d.alphas(0);
        assert!((a - independent_alpha(951)).abs() < 1e-12);
        assert!((p - independent_alpha(901)).abs() < 1e-12);
        let (a, p) = d.alphas(19);
        assert!((a - independent_alpha(1)).abs() < 1e-12);
        assert!((p - independent_alpha(0)).abs() < 1e-12);
        let mut one = spec();
        one.set_alpha_to_one = true;
        assert_eq!(Ddim::new(&one, 20).unwrap().alphas(19).1, 1.0);
    }

    #[test]
    fn step_follows_the_ddim_formula() {
        let d = Ddim::new(&spec(), 20).unwrap();
        let (x, e) = (0.7f32, -0.3f32);
        let mut s = [x];
        d.step(3, &[e], &mut s);
        let (a_t, a_p) = d.alphas(3);
        let x0 = (f64::from(x) - (1.0 - a_t).sqrt() * f64::from(e)) / a_t.sqrt();
        let want = a_p.sqrt() * x0 + (1.0 - a_p).sqrt() * f64::from(e);
        assert!((f64::from(s[0]) - want).abs() < 1e-6, "{} vs {want}", s[0]);
        // A perfect noise prediction recovers x0 after the whole run.
        let x0 = 0.25f64;
        let eps = 0.8f64;
        let a0 = d.alpha_cumprod(951);
        let mut s = [(a0.sqrt() * x0 + (1.0 - a0).sqrt() * eps) as f32];
        for i in 0..20 {
            d.step(i, &[eps as f32], &mut s);
        }
        let a_final = d.alpha_cumprod(0);
        let want = a_final.sqrt() * x0 + (1.0 - a_final).sqrt() * eps;
        assert!((f64::from(s[0]) - want).abs() < 1e-5);
    }

    #[test]
    fn guidance_combines_uncond_and_cond() {
        let mut u = vec![1.0f32, -2.0, 0.5];
        let c = [3.0f32, -2.0, -0.5];
        guide(&mut u, &c, 1.5);
        assert_eq!(u, vec![1.0 + 1.5 * 2.0, -2.0, 0.5 - 1.5]);
        let mut u = vec![4.0f32];
        guide(&mut u, &[2.0], 1.0);
        assert_eq!(u, vec![2.0]);
    }

    #[test]
    fn deepcache_schedule_is_the_reference_helpers() {
        let kinds = |interval: u32, steps: usize| -> String {
            (0..steps)
                .map(|i| {
                    if deepcache_full_step(interval, i) {
                        'F'
                    } else {
                        'S'
                    }
                })
                .collect()
        };
        // cache_interval = 3 (scripts/inference.py), 20 steps: full at 0, 3, ..., 18.
        assert_eq!(kinds(3, 20), "FSSFSSFSSFSSFSSFSSFS");
        assert_eq!(kinds(3, 20).matches('F').count(), 7);
        assert_eq!(kinds(2, 5), "FSFSF");
        assert_eq!(kinds(1, 4), "FFFF");
        assert_eq!(kinds(0, 4), "FFFF");
        assert_eq!(kinds(5, 1), "F");
    }

    #[test]
    fn chunks_of_sixteen_with_a_short_tail() {
        assert!(chunk_ranges(0, 16).is_empty());
        assert_eq!(chunk_ranges(16, 16), vec![0..16]);
        assert_eq!(chunk_ranges(37, 16), vec![0..16, 16..32, 32..37]);
        assert_eq!(chunk_ranges(252, 16).len(), 16);
        assert_eq!(chunk_ranges(252, 16).last(), Some(&(240..252)));
        assert_eq!(chunk_ranges(3, 16), vec![0..3]);
    }
}
