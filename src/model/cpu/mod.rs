//! Kernels of our own for the CPU, where candle's ops leave time on the
//! table: attention that never materialises its scores, and the thin
//! matrix products of decoding split across threads. Both call `gemm`, the
//! crate behind candle's CPU matmul, on the pieces.

pub mod attention;
pub mod linear;

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
