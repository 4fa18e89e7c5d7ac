//! Kernels of our own for the CPU, where candle's ops leave time on the
//! table: attention that never materialises its scores, the selectors'
//! attention probe in one pass per block of query rows, and the thin
//! matrix products of decoding split across threads. They call `gemm`, the
//! crate behind candle's CPU matmul, on the pieces, or [`bf16`]'s kernel.

pub mod attention;
pub mod attention_grad;
pub mod bf16;
pub mod linear;
pub mod probe;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

/// Whether the kernels here can take `t`: f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// The elements of a contiguous f32 CPU tensor's storage.
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("the CPU kernels need contiguous f32 tensors on the CPU"),
    }
}

/// A row-major or column-major matrix in memory: its first element and the
/// steps between its columns and its rows.
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    col_step: usize,
    row_step: usize,
}

/// `dst = lhs rhs` (`accumulate`: `dst += lhs rhs`) for an `m x k` `lhs` and
/// a `k x n` `rhs`, on the calling thread: the callers already run in
/// parallel.
///
/// # Safety
/// Each matrix, with its steps, must lie inside one live allocation, and
/// `dst` must not overlap the others.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_step as isize,
            dst.row_step as isize,
            accumulate,
            lhs.ptr,
            lhs.col_step as isize,
            lhs.row_step as isize,
            rhs.ptr,
            rhs.col_step as isize,
            rhs.row_step as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// max |a - b| over two f32 tensors of one shape, for the kernels' tests.
#[cfg(test)]
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}
