//! Attention on the CPU without the score matrix: queries in blocks of rows,
//! keys in blocks of columns, an online softmax between them (FlashAttention's
//! recurrence), and `gemm`'s kernels for the two products of each tile.
//!
//! The materialised path (`model/attention.rs`) computes `[rows, keys]`
//! scores, then passes over them to add the mask, to softmax (scalar `expf`)
//! and to cut them per segment: at 4,000 tokens the profile of SmolLM2's
//! prefill had about half its samples there, most of it memory traffic.
//! Here a tile of scores lives in a buffer the size of the L2 cache, the
//! exponential is vectorised, and a tile whose every score is masked (a
//! causal chunk's future) is skipped.
//!
//! Training's chunk attention runs it too, through `attention_grad.rs`,
//! whose backward pass recomputes the probabilities; training passes that
//! read a past keep the materialised path.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::bf16::{self, PackedBf16};
use super::{Strided, f32_slice, product};

/// Query rows per task and key columns per tile: a tile's scores (32 KiB)
/// and the block's output stay in L1/L2 however long the context.
const ROWS: usize = 32;
const COLS: usize = 256;

/// One run of keys and values, `[1 or batch, kv_heads, len, head_dim]`.
pub struct Segment<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// An additive `[kv_heads, len]` term on this segment's scores.
    pub bias: Option<&'a Tensor>,
    /// Where this segment's columns start in the mask, if the mask covers it.
    pub mask_offset: Option<usize>,
}

/// `softmax(q k^T + bias + mask) v` over the segments' keys, as if they were
/// one concatenated run.
///
/// `q` is `[batch, kv_heads, group * seq, head_dim]` and already scaled: the
/// `group` query heads that share a KV head stacked along the rows, so row
/// `r` is position `r % seq`. `mask` is additive, `[1 or batch, seq, keys]`
/// over the columns of the segments that have a `mask_offset`. Returns
/// `[batch, kv_heads, group * seq, head_dim]`.
///
/// `bf16`: on a CPU with AVX512-BF16, a pass of at least [`BF16_ROWS`]
/// rows runs both products on bf16 operands ([`bf16`]), summed in f32:
/// each segment's keys and values packed once for all of its rows, the
/// queries and each tile's probabilities rounded as they come.
pub fn attend(
    q: &Tensor,
    segments: &[Segment],
    mask: Option<&Tensor>,
    seq: usize,
    bf16: bool,
) -> Result<Tensor> {
    let (batch, kv_heads, rows, hd) = q.dims4()?;
    if q.elem_count() == 0 {
        return Tensor::zeros(q.dims(), DType::F32, &Device::Cpu);
    }
    let q = q.contiguous()?;
    let q_guard = q.storage_and_layout();
    let q_data = f32_slice(&q_guard.0, q_guard.1)?;
    let mask = mask.map(as_f32).transpose()?;
    let mask_guard = mask.as_ref().map(Tensor::storage_and_layout);
    let mask_view = match &mask_guard {
        Some((storage, layout)) => {
            let dims = layout.dims();
            let [mask_rows, mask_seq, keys] = dims else {
                candle_core::bail!("attention mask of shape {dims:?}, want [batch, seq, keys]")
            };
            if *mask_seq != seq || (*mask_rows != 1 && *mask_rows != batch) {
                candle_core::bail!("attention mask of shape {dims:?} for {batch} rows of {seq}")
            }
            Some(MaskView {
                data: f32_slice(storage, layout)?,
                batched: *mask_rows != 1,
                keys: *keys,
            })
        }
        None => None,
    };
    let tensors: Vec<(Tensor, Tensor, Option<Tensor>)> = segments
        .iter()
        .map(|s| {
            Ok((
                s.k.contiguous()?,
                s.v.contiguous()?,
                s.bias.map(as_f32).transpose()?,
            ))
        })
        .collect::<Result<_>>()?;
    let guards: Vec<_> = tensors
        .iter()
        .map(|(k, v, b)| {
            (
                k.storage_and_layout(),
                v.storage_and_layout(),
                b.as_ref().map(Tensor::storage_and_layout),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(segments.len());
    for ((segment, (k, v, bias)), (kt, _, _)) in segments.iter().zip(&guards).zip(&tensors) {
        let (k_rows, k_heads, len, k_hd) = kt.dims4()?;
        if k_heads != kv_heads || k_hd != hd || (k_rows != 1 && k_rows != batch) {
            candle_core::bail!(
                "attention segment of shape {:?} for queries {:?}",
                kt.dims(),
                q.dims()
            )
        }
        if let Some(bias) = segment.bias
            && bias.dims() != [kv_heads, len]
        {
            candle_core::bail!(
                "attention bias of shape {:?} for {kv_heads} heads of {len} keys",
                bias.dims()
            )
        }
        if let (Some(offset), Some(mask)) = (segment.mask_offset, &mask_view)
            && offset + len > mask.keys
        {
            candle_core::bail!(
                "attention mask of {} keys, segment ends at {}",
                mask.keys,
                offset + len
            )
        }
        views.push(SegmentView {
            k: f32_slice(&k.0, k.1)?,
            v: f32_slice(&v.0, v.1)?,
            bias: bias.as_ref().map(|(s, l)| f32_slice(s, l)).transpose()?,
            batched: k_rows != 1,
            len,
            mask_offset: segment.mask_offset,
            packed: None,
        });
    }
    let packed: Vec<Option<Vec<Packed>>> = segments_packed(
        &views,
        kv_heads,
        hd,
        bf16 && rows >= BF16_ROWS && bf16::available(),
    );
    for (view, packed) in views.iter_mut().zip(&packed) {
        view.packed = packed.as_deref();
    }
    let shape = Shape {
        kv_heads,
        hd,
        seq,
        softmax: softmax_kernel(),
    };
    let mut out = vec![0f32; batch * kv_heads * rows * hd];
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(rows * hd)
        .enumerate()
        .flat_map(|(bh, head)| {
            head.chunks_mut(ROWS * hd)
                .enumerate()
                .map(move |(block, o)| (bh, block * ROWS, o))
        })
        .collect();
    tasks.into_par_iter().for_each(|(bh, first_row, o)| {
        let task = Task {
            batch: bh / kv_heads,
            head: bh % kv_heads,
            first_row,
            q: &q_data[(bh * rows + first_row) * hd..][..o.len()],
        };
        task.run(&shape, &views, mask_view.as_ref(), o);
    });
    Tensor::from_vec(out, (batch, kv_heads, rows, hd), &Device::Cpu)
}

/// The mask and bias come in the accumulation dtype: f32 for an f32 model.
fn as_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// What every task of one call shares.
struct Shape {
    kv_heads: usize,
    hd: usize,
    seq: usize,
    /// [`softmax_tile`] compiled for this CPU, picked once per call.
    softmax: SoftmaxTile,
}

struct MaskView<'a> {
    data: &'a [f32],
    batched: bool,
    keys: usize,
}

struct SegmentView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    batched: bool,
    len: usize,
    mask_offset: Option<usize>,
    /// The keys and values in bf16, per (batch row,) KV head, for a pass
    /// that runs the bf16 products.
    packed: Option<&'a [Packed]>,
}

/// At least this many query rows (a prefill's) run the bf16 products: a
/// decoding step's few would not repay packing the keys and values.
pub const BF16_ROWS: usize = 64;

/// One KV head's keys `[len, hd]` and values transposed `[hd, len]`,
/// packed for [`bf16::window_product`].
struct Packed {
    k: PackedBf16,
    v_t: PackedBf16,
}

/// Each segment's [`Packed`] K/V per (batch row,) head when `pack`.
fn segments_packed(
    views: &[SegmentView],
    kv_heads: usize,
    hd: usize,
    pack: bool,
) -> Vec<Option<Vec<Packed>>> {
    views
        .iter()
        .map(|view| {
            pack.then(|| {
                debug_assert_eq!(view.k.len() / (view.len * hd).max(1) % kv_heads, 0);
                // Each head's values `[len, hd]` as `[hd, len]`.
                let mut v_t = vec![0f32; view.v.len()];
                v_t.par_chunks_mut(view.len * hd)
                    .zip(view.v.par_chunks(view.len * hd))
                    .for_each(|(v_t, v)| {
                        for (i, row) in v.chunks_exact(hd).enumerate() {
                            for (j, x) in row.iter().enumerate() {
                                v_t[j * view.len + i] = *x;
                            }
                        }
                    });
                let keys = PackedBf16::per_matrix(view.k, view.len, hd);
                let values = PackedBf16::per_matrix(&v_t, hd, view.len);
                keys.into_iter()
                    .zip(values)
                    .map(|(k, v_t)| Packed { k, v_t })
                    .collect()
            })
        })
        .collect()
}

/// One block of query rows of one (batch row, KV head).
struct Task<'a> {
    batch: usize,
    head: usize,
    first_row: usize,
    q: &'a [f32],
}

impl Task<'_> {
    fn run(
        &self,
        shape: &Shape,
        segments: &[SegmentView],
        mask: Option<&MaskView>,
        out: &mut [f32],
    ) {
        let hd = shape.hd;
        let n = out.len() / hd;
        let mut max = vec![f32::NEG_INFINITY; n];
        let mut sum = vec![0f32; n];
        let mut scores = vec![0f32; n * COLS];
        // The bf16 products' queries, and a tile's probabilities, as pairs.
        let q_pairs = segments
            .iter()
            .any(|s| s.packed.is_some())
            .then(|| bf16::rows_to_pairs(self.q, hd));
        let mut p_pairs = vec![0u32; if q_pairs.is_some() { n * COLS / 2 } else { 0 }];
        for segment in segments {
            let at = if segment.batched {
                self.batch * shape.kv_heads + self.head
            } else {
                self.head
            };
            let keys = &segment.k[at * segment.len * hd..][..segment.len * hd];
            let values = &segment.v[at * segment.len * hd..][..segment.len * hd];
            let bias = segment
                .bias
                .map(|b| &b[self.head * segment.len..][..segment.len]);
            for start in (0..segment.len).step_by(COLS) {
                let cols = COLS.min(segment.len - start);
                // The mask's rows for this tile, one per query row.
                let mask_rows = |r: usize| -> Option<&[f32]> {
                    let (mask, offset) = (mask?, segment.mask_offset?);
                    let position = (self.first_row + r) % shape.seq;
                    let row = if mask.batched {
                        self.batch * shape.seq + position
                    } else {
                        position
                    };
                    Some(&mask.data[row * mask.keys + offset + start..][..cols])
                };
                if (0..n).all(|r| {
                    mask_rows(r).is_some_and(|m| m.iter().all(|x| *x == f32::NEG_INFINITY))
                }) {
                    continue;
                }
                let tile = &mut scores[..n * cols];
                match (segment.packed, &q_pairs) {
                    (Some(packed), Some(q_pairs)) => bf16::window_product(
                        (q_pairs, hd.div_ceil(2)),
                        n,
                        &packed[at].k,
                        (start, cols),
                        (0, hd.div_ceil(2)),
                        (tile, cols),
                        false,
                    ),
                    // SAFETY: the pointers and steps describe `n x hd`, `hd x
                    // cols` (keys read transposed) and `n x cols` matrices
                    // inside the slices above.
                    _ => unsafe {
                        product(
                            (n, cols, hd),
                            Strided {
                                ptr: tile.as_mut_ptr(),
                                col_step: 1,
                                row_step: cols,
                            },
                            false,
                            Strided {
                                ptr: self.q.as_ptr(),
                                col_step: 1,
                                row_step: hd,
                            },
                            Strided {
                                ptr: keys[start * hd..].as_ptr(),
                                col_step: hd,
                                row_step: 1,
                            },
                        );
                    },
                }
                for (r, row) in tile.chunks_exact_mut(cols).enumerate() {
                    let bias = bias.map(|b| &b[start..start + cols]);
                    let rescale =
                        (shape.softmax)(row, bias, mask_rows(r), &mut max[r], &mut sum[r]);
                    if rescale != 1.0 {
                        out[r * hd..(r + 1) * hd]
                            .iter_mut()
                            .for_each(|o| *o *= rescale);
                    }
                }
                match segment.packed {
                    Some(packed) => {
                        let pairs = cols.div_ceil(2);
                        let p = &mut p_pairs[..n * pairs];
                        for (row, dst) in tile.chunks_exact(cols).zip(p.chunks_mut(pairs)) {
                            bf16::to_pairs(row, dst);
                        }
                        bf16::window_product(
                            (p, pairs),
                            n,
                            &packed[at].v_t,
                            (0, hd),
                            (start / 2, pairs),
                            (out, hd),
                            true,
                        );
                    }
                    // SAFETY: `n x cols` probabilities times the `cols x hd`
                    // values of this tile, added to the `n x hd` output.
                    None => unsafe {
                        product(
                            (n, hd, cols),
                            Strided {
                                ptr: out.as_mut_ptr(),
                                col_step: 1,
                                row_step: hd,
                            },
                            true,
                            Strided {
                                ptr: tile.as_ptr(),
                                col_step: 1,
                                row_step: cols,
                            },
                            Strided {
                                ptr: values[start * hd..].as_ptr(),
                                col_step: 1,
                                row_step: hd,
                            },
                        );
                    },
                }
            }
        }
        for (row, total) in out.chunks_exact_mut(hd).zip(&sum) {
            let inverse = if *total > 0.0 { total.recip() } else { 0.0 };
            row.iter_mut().for_each(|o| *o *= inverse);
        }
    }
}

/// [`softmax_tile`]'s signature.
pub(super) type SoftmaxTile =
    fn(&mut [f32], Option<&[f32]>, Option<&[f32]>, &mut f32, &mut f32) -> f32;

/// [`softmax_tile`] with AVX-512 or AVX2 and FMA where the CPU has them
/// (the same operations, 16 or 8 lanes an instruction), else portable.
pub(super) fn softmax_kernel() -> SoftmaxTile {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return |row, bias, mask, max, sum| unsafe {
                softmax_tile_avx512(row, bias, mask, max, sum)
            };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            return |row, bias, mask, max, sum| unsafe {
                softmax_tile_avx2(row, bias, mask, max, sum)
            };
        }
    }
    softmax_tile
}

/// [`softmax_tile`] compiled for the CPU features `$features`: Rust takes
/// one function per set.
macro_rules! softmax_tile_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            row: &mut [f32],
            bias: Option<&[f32]>,
            mask: Option<&[f32]>,
            max: &mut f32,
            sum: &mut f32,
        ) -> f32 {
            softmax_tile(row, bias, mask, max, sum)
        }
    };
}

softmax_tile_for!(softmax_tile_avx512, "avx512f,fma");
softmax_tile_for!(softmax_tile_avx2, "avx2,fma");

/// One row of a tile: adds the bias and mask, moves the row's running
/// maximum, turns the scores into `exp(score - max)` in place and adds them
/// to the running sum. Returns the factor the row's output so far must be
/// scaled by (`exp(old max - new max)`).
#[inline(always)]
fn softmax_tile(
    row: &mut [f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    max: &mut f32,
    sum: &mut f32,
) -> f32 {
    for extra in [bias, mask].into_iter().flatten() {
        row.iter_mut().zip(extra).for_each(|(s, e)| *s += e);
    }
    let new_max = max.max(lanes(row, f32::NEG_INFINITY, f32::max));
    if new_max == f32::NEG_INFINITY {
        row.iter_mut().for_each(|s| *s = 0.0);
        return 1.0;
    }
    row.iter_mut().for_each(|s| *s = exp(*s - new_max));
    let total = lanes(row, 0.0, |a, b| a + b);
    let rescale = exp(*max - new_max);
    *sum = *sum * rescale + total;
    *max = new_max;
    rescale
}

/// `row` folded with `f` in 16 independent lanes, then the lanes folded: a
/// loop the compiler vectorises, which a single accumulator (a strict chain
/// of float operations) is not.
#[inline(always)]
fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a = f(*a, *x);
        }
    }
    tail.iter().chain(&acc).fold(init, |a, x| f(a, *x))
}

/// `e^x` for `x <= 0`, to within a few f32 ulps, written so that a loop over
/// it vectorises: Cody-Waite reduction to `x = n ln 2 + r`, `|r| <= ln2 / 2`,
/// a degree-6 Taylor polynomial for `e^r`, and `2^n` built in the exponent
/// bits. Below `-87` (and at `-inf`) it is 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.max(-87.0);
    // Adding 1.5 * 2^23 rounds to an integer n, which then sits in the low
    // mantissa bits: shifted into the exponent field (with its bias, 127),
    // they make 2^n with integer operations alone.
    const ROUND: f32 = 12_582_912.0;
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

#[cfg(test)]
pub(in crate::model) mod tests {
    use super::*;
    use crate::model::cpu;

    pub(in crate::model) fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// The same attention with every score materialised, differentiable.
    pub(in crate::model::cpu) fn reference(
        q: &Tensor,
        segments: &[Segment],
        mask: Option<&Tensor>,
        seq: usize,
    ) -> Result<Tensor> {
        let (batch, kv_heads, rows, _) = q.dims4()?;
        let group = rows / seq;
        let mut scores = Vec::new();
        let mut values = Vec::new();
        for s in segments {
            let len = s.k.dim(2)?;
            let k =
                s.k.broadcast_as((batch, kv_heads, len, s.k.dim(3)?))?
                    .contiguous()?;
            let mut part = q
                .matmul(&k.t()?)?
                .reshape((batch, kv_heads, group, seq, len))?;
            if let Some(bias) = s.bias {
                part = part.broadcast_add(&bias.reshape((1, kv_heads, 1, 1, len))?)?;
            }
            if let (Some(mask), Some(offset)) = (mask, s.mask_offset) {
                let m = mask.narrow(2, offset, len)?;
                part = part.broadcast_add(&m.reshape((m.dim(0)?, 1, 1, seq, len))?)?;
            }
            scores.push(part.reshape((batch, kv_heads, rows, len))?);
            values.push(
                s.v.broadcast_as((batch, kv_heads, len, s.v.dim(3)?))?
                    .contiguous()?,
            );
        }
        // candle's plain-op softmax, which has a backward pass.
        let probs = candle_nn::ops::softmax(&Tensor::cat(&scores, 3)?, candle_core::D::Minus1)?;
        probs.matmul(&Tensor::cat(&values, 2)?)
    }

    #[test]
    fn matches_materialised_scores_across_tiles_segments_and_masks() -> Result<()> {
        let (batch, kv_heads, group, seq, hd) = (2, 2, 3, 300, 16);
        // An odd length: a bf16 pair of values half padding.
        let (shared_len, past_len) = (520, 41);
        let q = random(&[batch, kv_heads, group * seq, hd], 1);
        let shared_k = random(&[1, kv_heads, shared_len, hd], 2);
        let shared_v = random(&[1, kv_heads, shared_len, hd], 3);
        // Head 1 keeps 20 fewer shared slots than head 0.
        let hidden: Vec<f32> = (0..kv_heads * shared_len)
            .map(|i| {
                if i >= 2 * shared_len - 20 {
                    f32::NEG_INFINITY
                } else {
                    0.1
                }
            })
            .collect();
        let bias = Tensor::from_vec(hidden, (kv_heads, shared_len), &Device::Cpu)?;
        let past_k = random(&[batch, kv_heads, past_len, hd], 4);
        let past_v = random(&[batch, kv_heads, past_len, hd], 5);
        let new_k = random(&[batch, kv_heads, seq, hd], 6);
        let new_v = random(&[batch, kv_heads, seq, hd], 7);
        // Causal over the new positions; the second row also hides its past.
        let keys = past_len + seq;
        let mask: Vec<f32> = (0..batch * seq * keys)
            .map(|i| {
                let (b, s, key) = (i / (seq * keys), i / keys % seq, i % keys);
                let hidden = key > past_len + s || (b == 1 && key < past_len);
                if hidden { f32::NEG_INFINITY } else { 0.0 }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (batch, seq, keys), &Device::Cpu)?;
        let segments = [
            Segment {
                k: &shared_k,
                v: &shared_v,
                bias: Some(&bias),
                mask_offset: None,
            },
            Segment {
                k: &past_k,
                v: &past_v,
                bias: None,
                mask_offset: Some(0),
            },
            Segment {
                k: &new_k,
                v: &new_v,
                bias: None,
                mask_offset: Some(past_len),
            },
        ];
        // bf16 products (where the CPU has them) round every operand.
        let tolerances = [(false, 1e-5), (true, 1e-2)];
        for (bf16, tolerance) in tolerances
            .into_iter()
            .take(1 + usize::from(bf16::available()))
        {
            for (segments, mask) in [(&segments[..], Some(&mask)), (&segments[2..], None)] {
                let got = attend(&q, segments, mask, seq, bf16)?;
                let want = reference(&q, segments, mask, seq)?;
                let diff = cpu::max_abs_diff(&got, &want)?;
                assert!(diff < tolerance, "bf16 {bf16}: largest difference {diff}");
            }
        }
        let misshapen = Segment {
            bias: Some(&new_k),
            ..segments[2]
        };
        assert!(attend(&q, &[misshapen], None, seq, false).is_err());
        let none = q.narrow(2, 0, 0)?;
        assert_eq!(
            attend(&none, &segments[2..], None, 0, true)?.dims(),
            none.dims()
        );
        Ok(())
    }

    #[test]
    fn exp_matches_the_library_below_zero() {
        for i in 0..20_000 {
            let x = -(i as f32) * 0.004;
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= want * 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }
}
