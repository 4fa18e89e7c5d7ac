//! `x @ w^T` with the weight held in bf16, on CPUs with AVX512-BF16: what
//! llama.cpp's bf16 path does, and about twice what `gemm`'s f32 kernel
//! reaches on such a CPU. The activations stay f32 everywhere else; each
//! product rounds its input rows to bf16 and accumulates in f32
//! (`vdpbf16ps`: two bf16 products summed into each f32 lane).
//!
//! The weight is packed once, at load, for the kernel: output features in
//! blocks of [`LANES`], and within a block, for each pair of input features,
//! the block's [`LANES`] pairs side by side, so that one pair of the input
//! broadcast against two vectors of the block advances 32 outputs by two
//! inputs.

use candle_core::{DType, Device, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::f32_slice;

/// Output features per block: two 16-lane vectors.
const LANES: usize = 32;

/// Input rows per tile: with two vectors each, 16 accumulators.
const TILE_ROWS: usize = 8;

/// Input pairs per pass over a block: the block's panel of them (32 KiB)
/// stays in L1 while every tile of rows runs over it.
const DEPTH: usize = 256;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[out, in]` weight in bf16, laid out for the kernel.
pub struct PackedBf16 {
    out: usize,
    inner: usize,
    /// `[blocks][pairs][LANES]`, each `u32` two bf16 (the even input
    /// feature in the low half); zeros past `out` and `inner`.
    data: Vec<u32>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16[{}, {}]", self.out, self.inner)
    }
}

impl PackedBf16 {
    /// Packs an f32 weight `[out, in]`, rounding to the nearest bf16. Each
    /// block's rows are rounded to pairs one after another, then
    /// interleaved: the model's load waits on this.
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (out, inner) = w.dims2()?;
        let w = w
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        Ok(Self::from_rows(f32_slice(&storage, layout)?, out, inner))
    }

    /// [`Self::pack`] of the row-major `[out, in]` matrix `ws`.
    pub(super) fn from_rows(ws: &[f32], out: usize, inner: usize) -> Self {
        let pairs = inner.div_ceil(2);
        let mut data = vec![0u32; out.div_ceil(LANES) * pairs * LANES];
        data.par_chunks_mut(pairs * LANES)
            .zip(ws.par_chunks(LANES * inner.max(1)))
            .for_each(|(dst, rows)| {
                let mut rounded = vec![0u32; LANES * pairs];
                for (row, pairs) in rows.chunks(inner.max(1)).zip(rounded.chunks_mut(pairs)) {
                    to_pairs(row, pairs);
                }
                let lanes = rows.len() / inner.max(1);
                for (p, dst) in dst.chunks_mut(LANES).enumerate() {
                    for (lane, d) in dst[..lanes].iter_mut().enumerate() {
                        *d = rounded[lane * pairs + p];
                    }
                }
            });
        PackedBf16 { out, inner, data }
    }

    /// [`Self::from_rows`] of each `[rows, width]` matrix stacked in `ws`
    /// (a head's keys, say), packed in parallel.
    pub(super) fn per_matrix(ws: &[f32], rows: usize, width: usize) -> Vec<Self> {
        let size = rows * width;
        (0..ws.len() / size.max(1))
            .into_par_iter()
            .map(|at| Self::from_rows(&ws[at * size..][..size], rows, width))
            .collect()
    }

    /// Output features `[block * LANES, ..)`'s pairs, `[pairs][LANES]`.
    fn panel(&self, block: usize) -> &[u32] {
        let pairs = self.inner.div_ceil(2);
        &self.data[block * pairs * LANES..][..pairs * LANES]
    }

    /// The weight `[out, in]` back in f32 (each value a bf16's).
    pub fn unpack(&self) -> Result<Tensor> {
        let pairs = self.inner.div_ceil(2);
        let mut w = vec![0f32; self.out * self.inner];
        w.par_chunks_mut(self.inner)
            .enumerate()
            .for_each(|(row, dst)| {
                let (block, lane) = (row / LANES, row % LANES);
                for (i, x) in dst.iter_mut().enumerate() {
                    let two = self.data[(block * pairs + i / 2) * LANES + lane];
                    let bits = if i % 2 == 0 { two } else { two >> 16 };
                    *x = bf16::from_bits(bits as u16).to_f32();
                }
            });
        Tensor::from_vec(w, (self.out, self.inner), &Device::Cpu)
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inner)
    }

    /// `x @ w^T` for a contiguous-able f32 `x` of shape `[..., in]`:
    /// `[..., out]` in f32. Needs [`available`].
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.inner) || x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!(
                "bf16 matmul of {dims:?} {:?} by a [{}, {}] weight",
                x.dtype(),
                self.out,
                self.inner
            )
        }
        if !available() {
            candle_core::bail!("this CPU has no AVX512-BF16")
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has an inner dimension") = self.out;
        let mut out = vec![0f32; rows * self.out];
        if rows > 0 && self.out > 0 {
            let x = x.contiguous()?;
            let (storage, layout) = x.storage_and_layout();
            let xs = f32_slice(&storage, layout)?;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` checked the instructions; the slices have
            // the sizes `product` reads and writes.
            unsafe {
                x86::product(self, xs, rows, &mut out)
            };
        }
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }
}

/// A row of f32 as bf16 pairs (the even value in the low half), rounded to
/// nearest even; an odd last value pairs with zero.
pub(super) fn to_pairs(row: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available` checked the instructions.
        return unsafe { x86::to_pairs(row, dst) };
    }
    to_pairs_scalar(row, dst)
}

/// The rows of the row-major `x` (`width` values each) as bf16 pairs,
/// `width.div_ceil(2)` a row: the left operand of [`window_product`].
pub(super) fn rows_to_pairs(x: &[f32], width: usize) -> Vec<u32> {
    let pairs = width.div_ceil(2);
    let mut out = vec![0u32; x.len() / width.max(1) * pairs];
    for (row, dst) in x.chunks_exact(width.max(1)).zip(out.chunks_mut(pairs)) {
        to_pairs(row, dst);
    }
    out
}

fn to_pairs_scalar(row: &[f32], dst: &mut [u32]) {
    for (two, d) in row.chunks(2).zip(dst) {
        let even = bf16::from_f32(two[0]).to_bits() as u32;
        let odd = two
            .get(1)
            .map_or(0, |&x| bf16::from_f32(x).to_bits() as u32);
        *d = even | odd << 16;
    }
}

/// `c (+)= a w^T` over a window of `w`: `rows` rows of bf16 pairs in `a`
/// (`a_step` apart) times input pairs `[pair, pair + depth)` of `w`, into
/// output columns `[first, first + cols)` of `w` (`first` a multiple of
/// [`LANES`]), written to the first `cols` columns of `rows` rows of `c`
/// (`c_step` apart). Adds to `c` when `accumulate`. Needs [`available`].
pub(super) fn window_product(
    (a, a_step): (&[u32], usize),
    rows: usize,
    w: &PackedBf16,
    (first, cols): (usize, usize),
    (pair, depth): (usize, usize),
    (c, c_step): (&mut [f32], usize),
    accumulate: bool,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(available(), "no AVX512-BF16");
    assert!(first % LANES == 0 && first + cols <= w.out);
    assert!(pair + depth <= w.inner.div_ceil(2) && depth <= a_step);
    assert!(a.len() >= (rows - 1) * a_step + depth && c.len() >= (rows - 1) * c_step + cols);
    for block in 0..cols.div_ceil(LANES) {
        let panel = &w.panel(first / LANES + block)[pair * LANES..];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the instructions are there, and the rows, pairs and
        // columns lie inside `a`, the panel and `c`, as checked above.
        unsafe {
            x86::block(
                (a.as_ptr(), a_step),
                rows,
                (panel.as_ptr(), depth),
                (c[block * LANES..].as_mut_ptr(), c_step),
                LANES.min(cols - block * LANES),
                accumulate,
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{DEPTH, LANES, PackedBf16, TILE_ROWS};

    /// The output, written by the blocks' tasks in disjoint columns.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: each task writes only its own block's columns.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    impl Out {
        /// # Safety
        /// `offset` lies inside the output.
        unsafe fn at(self, offset: usize) -> *mut f32 {
            // SAFETY: the caller's contract.
            unsafe { self.0.add(offset) }
        }
    }

    /// `out = x @ w^T`, `x` `[rows, in]` and `out` `[rows, out]`, row-major.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; `x` holds `rows * w.inner`
    /// values and `out` `rows * w.out`.
    pub(super) unsafe fn product(w: &PackedBf16, x: &[f32], rows: usize, out: &mut [f32]) {
        let pairs = w.inner.div_ceil(2);
        let mut a = vec![0u32; rows * pairs];
        a.par_chunks_mut(pairs)
            .zip(x.par_chunks(w.inner))
            .for_each(|(dst, row)| super::to_pairs(row, dst));
        let c = Out(out.as_mut_ptr());
        let n = w.out;
        (0..n.div_ceil(LANES)).into_par_iter().for_each(|b| {
            let cols = LANES.min(n - b * LANES);
            let panel = w.panel(b);
            for k0 in (0..pairs).step_by(DEPTH) {
                // SAFETY: row 0 and column `b * LANES` of `out`, and
                // pair `k0` of `a` and of the panel; the caller's contract.
                unsafe {
                    block(
                        (a[k0..].as_ptr(), pairs),
                        rows,
                        (panel[k0 * LANES..].as_ptr(), DEPTH.min(pairs - k0)),
                        (c.at(b * LANES), n),
                        cols,
                        k0 > 0,
                    )
                }
            }
        });
    }

    /// One block of [`super::window_product`], on pointers.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; the rows, pairs and columns lie
    /// inside their allocations.
    pub(super) unsafe fn block(
        (a, a_step): (*const u32, usize),
        rows: usize,
        (b, depth): (*const u32, usize),
        (c, c_step): (*mut f32, usize),
        cols: usize,
        accumulate: bool,
    ) {
        for r0 in (0..rows).step_by(TILE_ROWS) {
            // SAFETY: row `r0` of `a` and `c`; the caller's contract.
            let tile = unsafe {
                Tile {
                    a: a.add(r0 * a_step),
                    a_step,
                    b,
                    depth,
                    c: c.add(r0 * c_step),
                    c_step,
                    cols,
                    accumulate,
                }
            };
            // SAFETY: the caller's contract.
            unsafe {
                match TILE_ROWS.min(rows - r0) {
                    8 => tile.run::<8>(),
                    7 => tile.run::<7>(),
                    6 => tile.run::<6>(),
                    5 => tile.run::<5>(),
                    4 => tile.run::<4>(),
                    3 => tile.run::<3>(),
                    2 => tile.run::<2>(),
                    _ => tile.run::<1>(),
                }
            }
        }
    }

    /// [`super::to_pairs`], 32 values an instruction.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_pairs(row: &[f32], dst: &mut [u32]) {
        let whole = row.len() / 32;
        for i in 0..whole {
            // SAFETY: 32 values at `32 i` lie in `row`, 16 slots at `16 i`
            // in `dst`.
            unsafe {
                let lo = _mm512_loadu_ps(row.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(row.as_ptr().add(32 * i + 16));
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i).cast(), packed);
            }
        }
        super::to_pairs_scalar(&row[32 * whole..], &mut dst[16 * whole..]);
    }

    /// Up to [`TILE_ROWS`] rows by one block of [`LANES`] columns, over
    /// `depth` input pairs.
    struct Tile {
        a: *const u32,
        a_step: usize,
        b: *const u32,
        depth: usize,
        c: *mut f32,
        c_step: usize,
        cols: usize,
        /// Add to what `c` holds (a later pass over the input pairs).
        accumulate: bool,
    }

    impl Tile {
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn run<const R: usize>(&self) {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for p in 0..self.depth {
                // SAFETY: the panel holds `depth * LANES` values from `b`,
                // and each of the R rows `depth` values from its start.
                unsafe {
                    let b0: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(self.b.add(p * LANES).cast()));
                    let b1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(self.b.add(p * LANES + 16).cast()));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                            *self.a.add(r * self.a_step + p) as i32,
                        ));
                        acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
                    }
                }
            }
            let masks = [
                lane_mask(self.cols),
                lane_mask(self.cols.saturating_sub(16)),
            ];
            for (r, acc) in acc.iter().enumerate() {
                for (half, (&sum, &mask)) in acc.iter().zip(&masks).enumerate() {
                    if mask == 0 {
                        continue;
                    }
                    // SAFETY: the masked lanes are the tile's columns of row
                    // `r` of the output.
                    unsafe {
                        let dst = self.c.add(r * self.c_step + 16 * half);
                        let sum = if self.accumulate {
                            _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, dst))
                        } else {
                            sum
                        };
                        _mm512_mask_storeu_ps(dst, mask, sum);
                    }
                }
            }
        }
    }

    /// The first `cols` of 16 lanes.
    fn lane_mask(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu;

    fn bf16_round(t: &Tensor) -> Result<Tensor> {
        t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
    }

    #[test]
    fn packing_round_trips_to_the_bf16_weight() -> Result<()> {
        for (out, inner) in [(33, 7), (64, 48), (5, 2)] {
            let w = Tensor::randn(0f32, 1.0, (out, inner), &Device::Cpu)?;
            let packed = PackedBf16::pack(&w)?;
            assert_eq!(packed.dims(), (out, inner));
            let diff = cpu::max_abs_diff(&packed.unpack()?, &bf16_round(&w)?)?;
            assert_eq!(diff, 0.0, "[{out}, {inner}]");
        }
        Ok(())
    }

    /// Every tile height, a partial last block, an odd input width and a
    /// depth over [`DEPTH`] pairs, against f32 products of the rounded
    /// operands.
    #[test]
    fn matches_an_f32_product_of_the_rounded_operands() -> Result<()> {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return Ok(());
        }
        for (rows, out, inner) in [
            (1, 40, 33),
            (13, 70, 2 * DEPTH + 37),
            (8, 32, 64),
            (0, 8, 4),
        ] {
            let w = Tensor::randn(0f32, 1.0, (out, inner), &Device::Cpu)?;
            let x = Tensor::randn(0f32, 1.0, (1, rows, inner), &Device::Cpu)?;
            let got = PackedBf16::pack(&w)?.matmul_t(&x)?;
            let want = bf16_round(&x)?.broadcast_matmul(&bf16_round(&w)?.t()?)?;
            assert_eq!(got.dims(), [1, rows, out]);
            if rows == 0 {
                continue;
            }
            let diff = cpu::max_abs_diff(&got, &want)?;
            assert!(diff < 1e-3, "[{rows}, {inner}] x [{out}, {inner}]: {diff}");
        }
        Ok(())
    }

    #[test]
    fn a_mismatched_input_is_an_error() -> Result<()> {
        let packed = PackedBf16::pack(&Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?)?;
        assert!(
            packed
                .matmul_t(&Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?)
                .is_err()
        );
        Ok(())
    }
}
