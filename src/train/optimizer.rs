//! AdamW whose moments can be saved, and gradient clipping by global norm.
//!
//! candle-nn 0.11's `AdamW` keeps its moment estimates in private fields
//! with no accessor, so a checkpoint could not hold them and a resumed run
//! would restart them from zero: not the run it interrupted. This is the
//! same algorithm (PyTorch's `AdamW`: decoupled weight decay, bias-corrected
//! moments) with its state in the open.

use candle_core::{Tensor, Var};

use crate::error::{Error, InputError, Result};
use crate::train::CheckpointError;

/// PyTorch's defaults.
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// The optimizer state for a fixed list of parameters (same order on every call).
#[derive(Debug, Clone)]
pub struct AdamW {
    weight_decay: f64,
    /// First and second moment estimates, one per parameter, in f32.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken so far.
    steps: usize,
}

impl AdamW {
    /// Fresh state (zero moments) for `params`.
    pub fn new(params: &[&Var], weight_decay: f64) -> Result<Self> {
        let zeros = || {
            params
                .iter()
                .map(|p| Ok(p.as_tensor().zeros_like()?))
                .collect::<Result<Vec<_>>>()
        };
        Ok(AdamW {
            weight_decay,
            m: zeros()?,
            v: zeros()?,
            steps: 0,
        })
    }

    /// State saved by an earlier run after `steps` steps.
    pub fn restore(
        params: &[&Var],
        weight_decay: f64,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
        steps: usize,
    ) -> Result<Self> {
        let fits = |moments: &[Tensor]| {
            moments.len() == params.len()
                && moments
                    .iter()
                    .zip(params)
                    .all(|(t, p)| t.dims() == p.dims() && t.dtype() == p.dtype())
        };
        if !fits(&m) || !fits(&v) {
            return Err(CheckpointError::OptimizerState.into());
        }
        Ok(AdamW {
            weight_decay,
            m,
            v,
            steps,
        })
    }

    pub fn first_moments(&self) -> &[Tensor] {
        &self.m
    }

    pub fn second_moments(&self) -> &[Tensor] {
        &self.v
    }

    /// Updates every parameter with its gradient (same order as at creation).
    pub fn step(&mut self, params: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(InputError::OptimizerParams {
                held: self.m.len(),
                params: params.len(),
                grads: grads.len(),
            }
            .into());
        }
        self.steps += 1;
        let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let correct_m = 1.0 / (1.0 - BETA1.powi(t));
        let correct_v = 1.0 / (1.0 - BETA2.powi(t));
        for (i, (param, g)) in params.iter().zip(grads).enumerate() {
            // Gradients can carry the graph that made them; the moments must
            // not, or every step's graph would live as long as the optimizer.
            let g = g.detach();
            let m = ((&self.m[i] * BETA1)? + (&g * (1.0 - BETA1))?)?;
            let v = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let update = ((&m * correct_m)? / ((&v * correct_v)?.sqrt()? + EPS)?)?;
            let decayed = (param.as_tensor() * (1.0 - lr * self.weight_decay))?;
            param.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut squares = 0.0f64;
    for g in grads.iter() {
        squares += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = squares.sqrt();
    if !norm.is_finite() {
        return Err(Error::Diverged { norm });
    }
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_adamw_by_hand() -> Result<()> {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        let mut opt = AdamW::new(&[&p], 0.1)?;
        let g = Tensor::new(&[0.5f32, 0.0], &Device::Cpu)?;
        opt.step(&[&p], std::slice::from_ref(&g), 0.01)?;
        // Step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g).
        let got = p.as_tensor().to_vec1::<f32>()?;
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001)];
        assert!((got[0] - want[0] as f32).abs() < 1e-6, "{got:?}");
        assert!((got[1] - want[1] as f32).abs() < 1e-6, "{got:?}");
        // Restored state continues exactly as the original.
        let q = Var::new(got.as_slice(), &Device::Cpu)?;
        let mut copy = AdamW::restore(
            &[&q],
            0.1,
            opt.first_moments().to_vec(),
            opt.second_moments().to_vec(),
            1,
        )?;
        opt.step(&[&p], std::slice::from_ref(&g), 0.01)?;
        copy.step(&[&q], &[g], 0.01)?;
        assert_eq!(
            p.as_tensor().to_vec1::<f32>()?,
            q.as_tensor().to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn moments_never_hold_the_graph_of_a_gradient() -> Result<()> {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        let mut opt = AdamW::new(&[&p], 0.0)?;
        // A gradient that still carries the operations that made it.
        let x = Var::new(&[0.5f32, 0.25], &Device::Cpu)?;
        let g = (x.as_tensor() * 2.0)?;
        assert!(g.track_op());
        opt.step(&[&p], &[g], 0.1)?;
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_global_norm() -> Result<()> {
        let mut grads = vec![
            Tensor::new(&[3.0f32], &Device::Cpu)?,
            Tensor::new(&[4.0f32], &Device::Cpu)?,
        ];
        assert_eq!(clip_global_norm(&mut grads, 10.0)?, 5.0);
        assert_eq!(grads[0].to_vec1::<f32>()?, [3.0]);
        assert_eq!(clip_global_norm(&mut grads, 1.0)?, 5.0);
        let clipped = grads[1].to_vec1::<f32>()?[0];
        assert!((clipped - 0.8).abs() < 1e-5, "{clipped}");
        let mut bad = vec![Tensor::new(&[f32::NAN], &Device::Cpu)?];
        assert!(clip_global_norm(&mut bad, 1.0).is_err());
        Ok(())
    }
}
