//! The few numerical ops whose fast candle kernels have no backward pass.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `rope` silently drop
//! gradients (candle issues 3568 and 3569). Training therefore runs the same
//! maths through plain tensor ops, selected by [`Path`]; tests check that both
//! paths give the same numbers.

use candle_core::{D, DType, Tensor};

use crate::error::Result;

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Path {
    /// Fused kernels, no gradients.
    #[default]
    Inference,
    /// Every op differentiable.
    Training,
}

/// The dtype softmax and norms accumulate in: at least f32.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Softmax over the last dimension, accumulated in at least f32 and returned
/// in the input's dtype.
pub fn softmax_last_dim(x: &Tensor, path: Path) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(accumulation_dtype(dtype))?;
    let y = match path {
        Path::Inference => candle_nn::ops::softmax_last_dim(&x)?,
        Path::Training => candle_nn::ops::softmax(&x, D::Minus1)?,
    };
    Ok(y.to_dtype(dtype)?)
}

/// RMSNorm over the last dimension with a learned per-channel weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    Ok(match path {
        Path::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?,
        Path::Training => {
            let dtype = x.dtype();
            let x = x.to_dtype(accumulation_dtype(dtype))?;
            let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = x.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
            normed.to_dtype(dtype)?.broadcast_mul(weight)?
        }
    })
}

/// `x @ w` for `x` of shape `[..., in]` and a 2-D `w` of shape `[in, out]`,
/// flattening the leading dimensions so the CPU and CUDA backends use a plain
/// (not broadcast) matmul.
pub fn matmul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, inner[0]))?.matmul(w)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(w.dim(1)?);
    Ok(y.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let a = softmax_last_dim(&x, Path::Inference)?;
        let b = softmax_last_dim(&x, Path::Training)?;
        assert!(max_diff(&a, &b) < 1e-6);
        let a = rms_norm(&x, &w, 1e-6, Path::Inference)?;
        let b = rms_norm(&x, &w, 1e-6, Path::Training)?;
        assert!(max_diff(&a, &b) < 1e-5);
        Ok(())
    }

    #[test]
    fn matmul_last_flattens_batches() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let y = matmul_last(&x, &w)?;
        assert_eq!(y.dims(), &[2, 3, 5]);
        assert!(max_diff(&y, &x.broadcast_matmul(&w)?) < 1e-5);
        Ok(())
    }
}
