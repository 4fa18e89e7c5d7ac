//! A layer's projection, `x @ w^T + b`: candle's `Linear`, or on a CPU with
//! AVX512-BF16 running in bf16, the same weight packed for
//! [`cpu::bf16`](super::cpu::bf16), at half the memory.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::Linear;

use super::cpu::bf16::PackedBf16;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Projection(Weight);

#[derive(Debug, Clone)]
enum Weight {
    Dense(Linear),
    Bf16 {
        weight: Arc<PackedBf16>,
        bias: Option<Tensor>,
    },
}

impl From<Linear> for Projection {
    fn from(linear: Linear) -> Self {
        Projection(Weight::Dense(linear))
    }
}

impl Projection {
    /// `x @ weight^T + bias`; with `bf16`, the weight rounded to bf16 and
    /// packed for the CPU kernel at once, the f32 copy dropped.
    pub fn new(weight: Tensor, bias: Option<Tensor>, bf16: bool) -> Result<Self> {
        Ok(Projection(if bf16 {
            Weight::Bf16 {
                weight: Arc::new(PackedBf16::pack(&weight)?),
                bias,
            }
        } else {
            Weight::Dense(Linear::new(weight, bias))
        }))
    }

    /// The packed weight, if this projection has one.
    pub fn bf16(&self) -> Option<&PackedBf16> {
        match &self.0 {
            Weight::Dense(_) => None,
            Weight::Bf16 { weight, .. } => Some(weight),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match &self.0 {
            Weight::Dense(linear) => linear.bias(),
            Weight::Bf16 { bias, .. } => bias.as_ref(),
        }
    }

    /// The projection as candle's `Linear`: a packed weight is unpacked to
    /// f32 (a copy; for the passes the kernel does not take: gradients).
    pub fn linear(&self) -> Result<std::borrow::Cow<'_, Linear>> {
        Ok(match &self.0 {
            Weight::Dense(linear) => std::borrow::Cow::Borrowed(linear),
            Weight::Bf16 { weight, bias } => {
                std::borrow::Cow::Owned(Linear::new(weight.unpack()?, bias.clone()))
            }
        })
    }
}
