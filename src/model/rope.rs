//! Rotary position embeddings (RoPE), computed from explicit position ids.
//!
//! Tables are built in f32 whatever the compute dtype (as transformers does),
//! because bf16 angles lose whole radians at positions in the thousands.

use candle_core::{D, DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::ops::Kernels;
use crate::error::Result;

/// The per-pair rotation frequencies of one model.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[head_dim / 2]`, f32.
    inv_freq: Tensor,
}

/// Cosine and sine tables for a batch of positions, `[batch, seq, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let inv_freq =
            inverse_frequencies(config.head_dim, config.rope_theta, &config.rope_scaling);
        let inv_freq: Vec<f32> = inv_freq.into_iter().map(|f| f as f32).collect();
        let len = inv_freq.len();
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv_freq, len, device)?,
        })
    }

    /// Tables for integer `positions` of shape `[batch, seq]`, cast to `dtype`.
    pub fn tables(&self, positions: &Tensor, dtype: DType) -> Result<RopeTables> {
        let angles = positions
            .to_dtype(DType::F32)?
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        Ok(RopeTables {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` (the "rotate half"
    /// layout of Llama and Qwen checkpoints).
    pub fn apply(x: &Tensor, tables: &RopeTables, kernels: Kernels) -> Result<Tensor> {
        match kernels {
            Kernels::Inference => Ok(candle_nn::rotary_emb::rope(
                &x.contiguous()?,
                &tables.cos,
                &tables.sin,
            )?),
            Kernels::Training => {
                let cos = Tensor::cat(&[&tables.cos, &tables.cos], D::Minus1)?.unsqueeze(1)?;
                let sin = Tensor::cat(&[&tables.sin, &tables.sin], D::Minus1)?.unsqueeze(1)?;
                let half = x.dim(D::Minus1)? / 2;
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
            }
        }
    }
}

/// `theta^(-2i/d)` for each rotation pair, rescaled as the config asks.
fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64));
    match *scaling {
        RopeScaling::None => base.collect(),
        RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
        RopeScaling::Factors(ref factors) => base.zip(factors).map(|(f, k)| f / k).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_freq_wavelen {
                    f
                } else if wavelen > low_freq_wavelen {
                    f / factor
                } else {
                    let smooth = (old_len / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inverse_frequencies(64, 500_000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(64, 500_000.0, &scaling);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 8.0).abs() < 1e-18);
        assert!(
            scaled
                .iter()
                .zip(&plain)
                .all(|(s, p)| s <= p && *s >= p / 8.0)
        );
    }

    #[test]
    fn both_paths_rotate_alike() -> Result<()> {
        let dev = Device::Cpu;
        let inv_freq = Tensor::new(&[1.0f32, 0.1], &dev)?;
        let rope = Rope { inv_freq };
        let positions = Tensor::new(&[[0u32, 3, 7]], &dev)?;
        let tables = rope.tables(&positions, DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let fast = Rope::apply(&x, &tables, Kernels::Inference)?;
        let slow = Rope::apply(&x, &tables, Kernels::Training)?;
        let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
