//! The few numerical ops whose fast candle kernels have no backward pass,
//! and the frozen linear layer training needs.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `rope` silently drop
//! gradients (candle issues 3568 and 3569). Training, selected by [`Kernels`],
//! runs the softmax and norm kernels with a backward pass of our own
//! (`Backward`), and RoPE as plain tensor ops (its fused kernel with our
//! backward made the quality bench's training a fifth slower); tests check
//! both against candle's plain ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, D, DType, Layout, Shape, Storage, Tensor,
};
use candle_nn::{Linear, Module};

use super::cpu;
use super::projection::Projection;
use crate::error::Result;

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
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
pub fn softmax_last_dim(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(accumulation_dtype(dtype))?.contiguous()?;
    let probs = candle_nn::ops::softmax_last_dim(&x)?;
    let y = match kernels {
        Kernels::Inference => probs,
        Kernels::Training => with_backward(&x, &probs, Backward::Softmax)?,
    };
    Ok(y.to_dtype(dtype)?)
}

/// RMSNorm over the last dimension with a learned per-channel weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, kernels: Kernels) -> Result<Tensor> {
    Ok(match kernels {
        Kernels::Inference if x.dtype() != DType::F64 => {
            candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?
        }
        _ => {
            // The fused kernel normalises; the weight is applied outside it,
            // so that candle's own multiply carries its gradient.
            let dtype = x.dtype();
            let x = x.to_dtype(accumulation_dtype(dtype))?.contiguous()?;
            let normed = if x.dtype() == DType::F64 {
                // The kernel takes no f64 (and sums in f32); f64 is for
                // checking gradients against finite differences, whose
                // inference passes come here too.
                let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
            } else {
                let ones = Tensor::ones(x.dim(D::Minus1)?, x.dtype(), x.device())?;
                let normed = candle_nn::ops::rms_norm(&x, &ones, eps as f32)?;
                with_backward(&x, &normed, Backward::RmsNorm { eps })?
            };
            normed.to_dtype(dtype)?.broadcast_mul(weight)?
        }
    })
}

/// How a gradient goes back through one of candle's fused kernels, which
/// have none of their own. Built from plain ops instead, a softmax of
/// attention scores (the largest tensor of a training step) costs five
/// passes forward and five backward, each of those also zero-filling and
/// adding a gradient of its size; a norm costs as many.
#[derive(Debug, Clone, Copy)]
enum Backward {
    /// `y = softmax(x)` over the last dimension: `y * (g - sum(g * y))`.
    Softmax,
    /// `y = x / rms(x)` over the last dimension, with no weight:
    /// `(g - y * mean(g * y)) / rms(x)`.
    RmsNorm { eps: f64 },
}

/// `y`, the fresh output of a fused kernel run on `x`, as a function of `x`
/// for autograd through `backward`. The forward pass copies `y`, unless no
/// gradient reaches `x`.
fn with_backward(x: &Tensor, y: &Tensor, backward: Backward) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y.clone());
    }
    Ok(x.apply_op2(y, FusedKernel(backward))?)
}

struct FusedKernel(Backward);

impl FusedKernel {
    fn copy<S: BackendStorage>(y: &S, layout: &Layout) -> candle_core::Result<(S, Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("fused kernel backward: the output is not a fresh tensor");
        }
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp2 for FusedKernel {
    fn name(&self) -> &'static str {
        "fused-kernel-backward"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _x_layout: &Layout,
        y: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::copy(y, layout)
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _x_layout: &Layout,
        y: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::copy(y, layout)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _fused: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_x = match &self.0 {
            Backward::Softmax => {
                let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
                (y * grad.broadcast_sub(&dot)?)?
            }
            Backward::RmsNorm { eps } => {
                let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + *eps)?.sqrt()?;
                let dot = (grad * y)?.mean_keepdim(D::Minus1)?;
                (grad - y.broadcast_mul(&dot)?)?.broadcast_div(&rms)?
            }
        };
        Ok((Some(grad_x), None))
    }
}

/// `x @ w^T + b`. A packed bf16 weight runs [`cpu::bf16`] on inference
/// passes whose input records no ops. On `Kernels::Training` a weight that
/// is not a `Var` is frozen and the product is [`FrozenMatmul`], whose
/// backward pass gives the gradient of `x` only: candle's matmul backward
/// also computes a gradient for the weight, which nothing trains, and keeps
/// it to the end of the pass (for a Llama-3.2-1B-shaped model, gigabytes and
/// a third of the backward's work). A weight made from a `Var` (GMSA's
/// alignment block, cast to the model's dtype or not) gets its gradient.
pub fn linear(proj: &Projection, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if let Some(packed) = proj.bf16()
        && kernels == Kernels::Inference
        && !x.track_op()
        && cpu::applies(x)
    {
        return Ok(with_bias(packed.matmul_t(x)?, proj.bias())?);
    }
    let layer = proj.linear()?;
    if kernels == Kernels::Inference || layer.weight().track_op() {
        return Ok(inference_linear(&layer, x)?);
    }
    let weight = layer.weight();
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let y = x
        .reshape((rows, inner[0]))?
        .contiguous()?
        .apply_op1(FrozenMatmul {
            weight: weight.clone(),
        })?;
    let mut out_dims = lead.to_vec();
    out_dims.push(weight.dim(0)?);
    Ok(with_bias(y.reshape(out_dims)?, layer.bias())?)
}

/// `y + b`, broadcast over `y`'s rows, when there is a bias.
fn with_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A decoding step's few rows go to [`cpu::linear`], which spreads them
/// over the threads; the rest, and anything with a gradient, to candle.
fn inference_linear(layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let w = layer.weight();
    let dims = x.dims();
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    // The thin kernel has no backward pass: a product that records its ops
    // (a trained weight, or an input on the way to one) stays with candle.
    let thin = rows <= cpu::linear::MAX_ROWS
        && cpu::applies(x)
        && cpu::applies(w)
        && w.is_contiguous()
        && !w.track_op()
        && !x.track_op();
    if !thin {
        return layer.forward(x);
    }
    with_bias(cpu::linear::matmul_t(x, w)?, layer.bias())
}

/// `x @ w^T` for a 2-D `x` and a constant weight `w` (`[out, in]`), with a
/// backward pass for `x` alone.
struct FrozenMatmul {
    weight: Tensor,
}

impl FrozenMatmul {
    fn product<S: BackendStorage>(
        &self,
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (rows, inner) = x_layout.shape().dims2()?;
        let (out, w_inner) = w_layout.shape().dims2()?;
        if inner != w_inner {
            candle_core::bail!("frozen matmul: input width {inner}, weight {out}x{w_inner}");
        }
        let w_t = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, rows, out, inner), x_layout, &w_t)?;
        Ok((y, Shape::from((rows, out))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, w_layout) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Cpu(w) => self.product(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen matmul: the weight is not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (storage, w_layout) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Cuda(w) => self.product(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen matmul: the weight is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.weight)?))
    }
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
        let a = softmax_last_dim(&x, Kernels::Inference)?;
        let b = softmax_last_dim(&x, Kernels::Training)?;
        assert!(max_diff(&a, &b) < 1e-6);
        let a = rms_norm(&x, &w, 1e-6, Kernels::Inference)?;
        let b = rms_norm(&x, &w, 1e-6, Kernels::Training)?;
        assert!(max_diff(&a, &b) < 1e-5);
        Ok(())
    }

    /// The gradients of `sum(y * weights)` with respect to `vars`, as f32.
    fn gradients(y: Tensor, weights: &Tensor, vars: &[&Tensor]) -> Result<Vec<Tensor>> {
        let grads = (y * weights)?.sum_all()?.backward()?;
        vars.iter()
            .map(|v| Ok(grads.get(v).expect("a gradient").to_dtype(DType::F32)?))
            .collect()
    }

    #[test]
    fn the_training_path_has_the_plain_ops_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let var = |t: Tensor| candle_core::Var::from_tensor(&t.to_dtype(dtype)?);
            let x = var(Tensor::randn(0f32, 2.0, (2, 3, 8), &dev)?)?;
            let w = var(Tensor::randn(1f32, 0.1, 8, &dev)?)?;
            let weights = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?.to_dtype(dtype)?;
            let (x, w) = (x.as_tensor(), w.as_tensor());
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);

            let fused = softmax_last_dim(x, Kernels::Training)?;
            let plain = candle_nn::ops::softmax(x, D::Minus1)?;
            assert!(max_diff(&f32(&fused)?, &f32(&plain)?) < 1e-6);
            let got = gradients(fused, &weights, &[x])?;
            let expected = gradients(plain, &weights, &[x])?;
            assert!(max_diff(&got[0], &expected[0]) < 1e-5);

            let fused = rms_norm(x, w, 1e-6, Kernels::Training)?;
            let plain = candle_nn::ops::rms_norm_slow(x, w, 1e-6)?;
            assert!(max_diff(&f32(&fused)?, &f32(&plain)?) < 1e-5);
            let got = gradients(fused, &weights, &[x, w])?;
            let expected = gradients(plain, &weights, &[x, w])?;
            for (got, expected) in got.iter().zip(&expected) {
                assert!(max_diff(got, expected) < 1e-4);
            }
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_matches_linear_and_leaves_the_weight_without_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 4), &dev)?;
        let b = Tensor::randn(0f64, 1.0, 5, &dev)?;
        let layer: Projection = Linear::new(w.clone(), Some(b)).into();
        let x = candle_core::Var::new(&[[[1.0f64, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0]]], &dev)?;
        let fast = linear(&layer, x.as_tensor(), Kernels::Inference)?;
        let slow = linear(&layer, x.as_tensor(), Kernels::Training)?;
        assert!(max_diff(&fast.to_dtype(DType::F32)?, &slow.to_dtype(DType::F32)?) < 1e-6);
        let weights = Tensor::randn(0f64, 1.0, (1, 2, 5), &dev)?;
        let grads = (slow * &weights)?.sum_all()?.backward()?;
        let expected = weights.broadcast_matmul(&w)?;
        let got = grads.get(x.as_tensor()).expect("input gradient");
        assert!(max_diff(&got.to_dtype(DType::F32)?, &expected.to_dtype(DType::F32)?) < 1e-6);
        assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
        Ok(())
    }

    #[test]
    fn a_variable_weight_gets_its_gradient_on_the_training_path() -> Result<()> {
        let dev = Device::Cpu;
        let w = candle_core::Var::randn(0f32, 1.0, (5, 4), &dev)?;
        let layer: Projection = Linear::new(w.as_tensor().clone(), None).into();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?;
        let grads = linear(&layer, &x, Kernels::Training)?
            .sum_all()?
            .backward()?;
        let got = grads.get(w.as_tensor()).expect("weight gradient");
        let expected = Tensor::ones((5, 6), DType::F32, &dev)?.matmul(&x.reshape((6, 4))?)?;
        assert!(max_diff(got, &expected) < 1e-5);
        Ok(())
    }

    /// Inference runs the kernel; a pass with gradients takes the unpacked
    /// weight, and both agree with it.
    #[test]
    fn a_packed_projection_matches_its_unpacked_weight_on_both_paths() -> Result<()> {
        if !cpu::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return Ok(());
        }
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 24), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 40, &dev)?;
        let packed = Projection::new(w, Some(b), true)?;
        let exact = packed.linear()?.into_owned();
        let x = candle_core::Var::randn(0f32, 1.0, (2, 20, 24), &dev)?;
        let fast = linear(&packed, &x.as_tensor().detach(), Kernels::Inference)?;
        let want = exact.forward(x.as_tensor())?;
        // The kernel rounds the input to bf16 too.
        assert!(max_diff(&fast, &want) < 0.1, "{}", max_diff(&fast, &want));
        let slow = linear(&packed, x.as_tensor(), Kernels::Training)?;
        assert!(max_diff(&slow, &want) < 1e-5);
        let grads = slow.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
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
