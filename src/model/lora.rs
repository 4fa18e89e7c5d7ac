//! Low-rank extra weights on the q and v projections (LoRA), passed to a
//! forward pass rather than merged into the base weights, so one copy of the
//! base model serves as both the SAC compressor (with LoRA) and the frozen
//! decoder (without).

use candle_core::Tensor;

use super::ops::matmul_last;
use crate::error::Result;

/// `scale * (x @ a @ b)` with `a` of shape `[in, rank]` and `b` `[rank, out]`.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl LowRank {
    /// The term added to the base projection of `x` (`[..., in]`).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        Ok((matmul_last(&matmul_last(x, &a)?, &b)? * self.scale)?)
    }
}

/// The extra weights of one layer's attention.
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    pub q: Option<LowRank>,
    pub v: Option<LowRank>,
}

/// LoRA for every layer of a model, indexed by layer.
#[derive(Debug, Clone, Default)]
pub struct QvLora {
    pub layers: Vec<LayerLora>,
}
