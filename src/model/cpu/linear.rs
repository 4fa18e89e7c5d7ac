//! `x @ w^T` for a few rows of `x`, the shape of every product in a decoding
//! step. candle hands a one-row product to `gemm`'s matrix-vector kernel,
//! which runs on one thread: decoding read its weights with one core of two.
//! Here the output features are split in blocks across rayon's threads, each
//! block a `gemm` call of its own on the block's rows of `w`.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::{Strided, f32_slice, product};

/// At most this many rows take this path; more are a prefill, whose product
/// `gemm` already spreads over the threads.
pub const MAX_ROWS: usize = 16;

/// Output features per task.
const BLOCK: usize = 64;

/// `x @ w^T` for `x` of shape `[..., in]` with at most [`MAX_ROWS`] rows and
/// a contiguous f32 weight `w` of shape `[out, in]`: `[..., out]`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (features, inner) = w.dims2()?;
    let dims = x.dims();
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    if dims.last() != Some(&inner) || rows > MAX_ROWS {
        candle_core::bail!("thin matmul of {dims:?} by a [{features}, {inner}] weight")
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has an inner dimension") = features;
    if rows == 0 || features == 0 {
        return Tensor::zeros(out_dims, DType::F32, &Device::Cpu);
    }
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let xs = f32_slice(&x_storage, x_layout)?;
    let (w_storage, w_layout) = w.storage_and_layout();
    let ws = f32_slice(&w_storage, w_layout)?;
    // Column-major output, `[out, rows]`, so that each block of features
    // owns one contiguous run of it.
    let mut out = vec![0f32; features * rows];
    out.par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let first = block * BLOCK;
            let cols = dst.len() / rows;
            // SAFETY: `rows x inner` inputs (row-major) times the transposed
            // `cols x inner` block of `w` into a column-major `rows x cols`
            // block of the output, all inside the slices above.
            unsafe {
                product(
                    (rows, cols, inner),
                    Strided {
                        ptr: dst.as_mut_ptr(),
                        col_step: rows,
                        row_step: 1,
                    },
                    false,
                    Strided {
                        ptr: xs.as_ptr(),
                        col_step: 1,
                        row_step: inner,
                    },
                    Strided {
                        ptr: ws[first * inner..].as_ptr(),
                        col_step: inner,
                        row_step: 1,
                    },
                );
            }
        });
    let out = Tensor::from_vec(out, (features, rows), &Device::Cpu)?;
    if rows == 1 {
        out.reshape(out_dims)
    } else {
        out.t()?.contiguous()?.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu;

    #[test]
    fn matches_candles_matmul_for_one_and_several_rows() -> Result<()> {
        let w = Tensor::arange(0f32, 200.0 * 48.0, &Device::Cpu)?
            .reshape((200, 48))?
            .sin()?;
        for rows in [1, 3, MAX_ROWS] {
            let x = Tensor::arange(0f32, (rows * 48) as f32, &Device::Cpu)?
                .reshape((1, rows, 48))?
                .cos()?;
            let got = matmul_t(&x, &w)?;
            let want = x.broadcast_matmul(&w.t()?)?;
            assert_eq!(got.dims(), want.dims());
            let diff = cpu::max_abs_diff(&got, &want)?;
            assert!(diff < 1e-4, "{rows} rows: largest difference {diff}");
        }
        let empty = Tensor::zeros((2, 0, 48), DType::F32, &Device::Cpu)?;
        assert_eq!(matmul_t(&empty, &w)?.dims(), [2, 0, 200]);
        let tall = Tensor::zeros((MAX_ROWS + 1, 48), DType::F32, &Device::Cpu)?;
        assert!(matmul_t(&tall, &w).is_err());
        Ok(())
    }
}
