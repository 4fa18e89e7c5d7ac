//! The attention probe's weights ([`crate::model::probe`]) on the CPU in
//! one pass per block of query rows: the block's scores over the probe's
//! columns, the mask, a softmax with the vectorised exponential of
//! [`super::attention`], and the fold into the reported keys, all in a
//! buffer of the block's rows.
//!
//! The same weights through candle's ops (a matmul per column run, the
//! mask added, the runs joined, a softmax, three reductions) allocated and
//! passed over `[heads, rows, columns]` six times: on a 500-token KVzip
//! compress of SmolLM2 that was 0.41 s of 1.04 s, three times the repeat
//! pass's own attention.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::attention::{BF16_ROWS, softmax_kernel};
use super::bf16::{self, PackedBf16};
use super::{Strided, f32_slice, product};
use crate::model::probe::Reduce;

/// Query rows per task, as the attention kernel's.
const ROWS: usize = 32;

/// A run of the probe's columns: keys `[1 or batch, kv_heads, len,
/// head_dim]` whose scores take the mask's columns from `mask_offset`.
pub struct Columns<'a> {
    pub k: &'a Tensor,
    pub mask_offset: usize,
}

/// The softmax of the scaled queries `q` `[batch, kv_heads, group * seq,
/// head_dim]` (row `r` is position `r % seq`) over the columns of `runs`
/// under the additive `mask` `[1 or batch, seq, keys]`, taken on the
/// columns of `runs[reported]` and folded by `reduce` over every query row
/// of a KV head: `[kv_heads, len]` in f32. A row whose every column is
/// masked reports nothing.
///
/// `bf16`: the scores come from bf16 products where the attention kernel's
/// would ([`super::attention::attend`]'s rule), each run's keys packed
/// once per head.
pub fn measure(
    q: &Tensor,
    runs: &[Columns],
    reported: usize,
    mask: Option<&Tensor>,
    seq: usize,
    reduce: Reduce,
    bf16: bool,
) -> Result<Tensor> {
    let (batch, kv_heads, rows, hd) = q.dims4()?;
    let Some(report) = runs.get(reported) else {
        candle_core::bail!("probe reports run {reported} of {}", runs.len())
    };
    let reported_len = report.k.dim(2)?;
    let q = q.contiguous()?;
    let q_guard = q.storage_and_layout();
    let q_data = f32_slice(&q_guard.0, q_guard.1)?;
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    let mask_guard = mask.as_ref().map(Tensor::storage_and_layout);
    let mask_view = match (&mask_guard, &mask) {
        (Some((storage, layout)), Some(tensor)) => {
            let (mask_rows, mask_seq, keys) = tensor.dims3()?;
            if mask_seq != seq || (mask_rows != 1 && mask_rows != batch) {
                candle_core::bail!(
                    "probe mask of shape {:?} for {batch} rows of {seq}",
                    tensor.dims()
                )
            }
            Some((f32_slice(storage, layout)?, mask_rows != 1, keys))
        }
        _ => None,
    };
    let keys: Vec<Tensor> = runs
        .iter()
        .map(|r| r.k.contiguous())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = keys.iter().map(Tensor::storage_and_layout).collect();
    let mut views = Vec::with_capacity(runs.len());
    let mut offset = 0;
    for ((run, k), (storage, layout)) in runs.iter().zip(&keys).zip(&guards) {
        let (k_rows, k_heads, len, k_hd) = k.dims4()?;
        if k_heads != kv_heads || k_hd != hd || (k_rows != 1 && k_rows != batch) {
            candle_core::bail!(
                "probe keys of shape {:?} for queries {:?}",
                k.dims(),
                q.dims()
            )
        }
        if let Some((_, _, keys)) = mask_view
            && run.mask_offset + len > keys
        {
            candle_core::bail!(
                "probe mask of {keys} keys, a run ends at {}",
                run.mask_offset + len
            )
        }
        views.push(RunView {
            k: f32_slice(storage, layout)?,
            batched: k_rows != 1,
            len,
            mask_offset: run.mask_offset,
            column: offset,
        });
        offset += len;
    }
    let width = offset;
    let pack = bf16 && rows >= BF16_ROWS && bf16::available();
    let packed: Vec<Vec<PackedBf16>> = views
        .iter()
        .map(|run| {
            if pack {
                PackedBf16::per_matrix(run.k, run.len, hd)
            } else {
                Vec::new()
            }
        })
        .collect();
    let pairs = hd.div_ceil(2);
    let softmax = softmax_kernel();
    let partials: Vec<(usize, Vec<f32>)> = (0..batch * kv_heads)
        .flat_map(|bh| (0..rows).step_by(ROWS).map(move |first| (bh, first)))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(bh, first_row)| {
            let (b, head) = (bh / kv_heads, bh % kv_heads);
            let n = ROWS.min(rows - first_row);
            let q = &q_data[(bh * rows + first_row) * hd..][..n * hd];
            let mut scores = vec![0f32; n * width];
            let q_pairs = pack.then(|| bf16::rows_to_pairs(q, hd));
            for (run, packed) in views.iter().zip(&packed) {
                let at = if run.batched { bh } else { head };
                if let Some(q_pairs) = &q_pairs {
                    bf16::window_product(
                        (q_pairs, pairs),
                        n,
                        &packed[at],
                        (0, run.len),
                        (0, pairs),
                        (&mut scores[run.column..], width),
                        false,
                    );
                    continue;
                }
                let k = &run.k[at * run.len * hd..][..run.len * hd];
                // SAFETY: `n x hd` queries times the run's `hd x len` keys
                // (read transposed) into the run's columns of the `n x
                // width` scores, all inside the slices above.
                unsafe {
                    product(
                        (n, run.len, hd),
                        Strided {
                            ptr: scores[run.column..].as_mut_ptr(),
                            col_step: 1,
                            row_step: width,
                        },
                        false,
                        Strided {
                            ptr: q.as_ptr(),
                            col_step: 1,
                            row_step: hd,
                        },
                        Strided {
                            ptr: k.as_ptr(),
                            col_step: hd,
                            row_step: 1,
                        },
                    )
                };
            }
            let mut folded = vec![0f32; reported_len];
            let report = &views[reported];
            for (r, row) in scores.chunks_exact_mut(width).enumerate() {
                if let Some((data, batched, keys)) = mask_view {
                    let position = (first_row + r) % seq;
                    let mask_row = if batched {
                        b * seq + position
                    } else {
                        position
                    };
                    let mask_row = &data[mask_row * keys..][..keys];
                    for run in &views {
                        let columns = &mut row[run.column..][..run.len];
                        let mask = &mask_row[run.mask_offset..][..run.len];
                        columns.iter_mut().zip(mask).for_each(|(s, m)| *s += m);
                    }
                }
                let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
                softmax(row, None, None, &mut max, &mut sum);
                if sum <= 0.0 {
                    continue;
                }
                let inverse = sum.recip();
                let weights = row[report.column..][..report.len].iter();
                fold(reduce, &mut folded, weights.map(|w| w * inverse));
            }
            (head, folded)
        })
        .collect();
    let mut out = vec![0f32; kv_heads * reported_len];
    for (head, folded) in partials {
        let dst = &mut out[head * reported_len..][..reported_len];
        fold(reduce, dst, folded.into_iter());
    }
    if reduce == Reduce::Mean {
        let count = (batch * rows).max(1) as f32;
        out.iter_mut().for_each(|x| *x /= count);
    }
    Tensor::from_vec(out, (kv_heads, reported_len), &Device::Cpu)
}

/// `values` folded into `dst` by `reduce`: the larger of the two, or the
/// sum (a mean's, divided at the end).
fn fold(reduce: Reduce, dst: &mut [f32], values: impl Iterator<Item = f32>) {
    for (d, v) in dst.iter_mut().zip(values) {
        *d = match reduce {
            Reduce::Max => d.max(v),
            Reduce::Mean => *d + v,
        };
    }
}

/// A run's keys, and where its columns sit in a row of scores.
struct RunView<'a> {
    k: &'a [f32],
    batched: bool,
    len: usize,
    mask_offset: usize,
    column: usize,
}
