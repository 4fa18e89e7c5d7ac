//! One layer's attention over the K/V a pass reads (a shared document, the
//! row's own past) and its new positions, by one of three paths: the fused
//! CPU kernel ([`cpu::attention`]), which never materialises the scores; the
//! same kernel with a backward pass that recomputes them
//! ([`cpu::attention_grad`]), for training's passes over a chunk; or
//! candle's ops on the materialised scores, which other training passes and
//! other devices take (on CUDA, with the mask and softmax in one kernel of
//! our own, [`super::cuda`]). The first and last report the attention
//! probe's weights.

use candle_core::Tensor;

use super::block::BlockStep;
use super::cpu::{self, attention as fused};
use super::kv::{LayerKv, SharedKv};
use super::ops::{self, Kernels};
use crate::error::Result;

/// `softmax(q k^T) v` for the scaled queries `q` `[batch, kv_heads, group *
/// seq, head_dim]` (the `group` query heads of a KV head stacked along the
/// rows) against `shared`, the step's past and the new `(k, v)`; returns
/// the output in `q`'s shape and what the step's probe measured.
pub(super) fn attend(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    shared: Option<&SharedKv>,
    step: &BlockStep,
    (group, seq, hd): (usize, usize, usize),
) -> Result<(Tensor, Option<Tensor>)> {
    let tiled = cpu::applies(q);
    let training = step.kernels == Kernels::Training;
    // A chunk's own attention, as SAC's compressor runs it in training, is
    // the step's largest: the tiled kernel, and its scores recomputed in the
    // backward pass. Passes reading a past are a question's few rows, which
    // the materialised path serves as well.
    if tiled && training && shared.is_none() && step.past.is_none() && step.probe.is_none() {
        let mask = step
            .mask
            .map(|m| m.reshape((m.dim(0)?, seq, seq)))
            .transpose()?;
        let out = cpu::attention_grad::attend_differentiable(q, (k, v), mask.as_ref(), seq)?;
        return Ok((out, None));
    }
    if !tiled || training || [q, k, v].iter().any(|t| t.track_op()) {
        return plain_attention(q, (k, v), shared, step, (group, seq, hd));
    }
    let measured = step
        .probe
        .map(|p| p.measure_on_cpu(q, step.past, k, step.mask, seq, step.bf16))
        .transpose()?;
    Ok((fused_attention(q, (k, v), shared, step, seq)?, measured))
}

/// Attention through materialised scores: the path of devices without the
/// fused kernel, of training passes that read a past, and of any pass whose
/// inputs carry a graph. `q` is
/// `[batch, kv_heads, group * seq, head_dim]`, scaled; returns the output in
/// the same shape and what the probe measured.
fn plain_attention(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    shared: Option<&SharedKv>,
    step: &BlockStep,
    (group, seq, hd): (usize, usize, usize),
) -> Result<(Tensor, Option<Tensor>)> {
    let rows = q.dim(2)?;
    let shared_len = shared.map_or(0, |s| s.kv.len());
    let past_len = step.past.map_or(0, LayerKv::len);
    // The row's own past and its new positions, as one segment or two.
    // Joining them copies the past's K/V once ([keys, hd]); keeping them
    // apart copies scores and weights instead ([rows, keys]) but never
    // the past, which is what a decoding step of a few rows wants.
    let joined = match step.past {
        Some(past) if rows > hd => Some(LayerKv {
            k: Tensor::cat(&[&past.k, k], 2)?,
            v: Tensor::cat(&[&past.v, v], 2)?,
        }),
        _ => None,
    };
    let own = match (step.past, &joined) {
        (_, Some(joined)) => q.matmul(&joined.k.t()?)?,
        (Some(past), None) => Tensor::cat(&[q.matmul(&past.k.t()?)?, q.matmul(&k.t()?)?], 3)?,
        (None, None) => q.matmul(&k.t()?)?,
    };
    let keys = shared_len + past_len + seq;
    let (probs, measured) = match one_kernel_softmax(&own, shared, step, seq)? {
        // The probe then reads only its own columns, as the fused CPU path's does.
        Some(probs) => {
            let measured = step
                .probe
                .map(|p| p.measure_from_keys(q, step.past, k, step.mask, (group, seq)))
                .transpose()?;
            (probs, measured)
        }
        None => softmax_materialised(q, own, shared, step, (group, seq))?,
    };
    let own_weights = |start: usize, len: usize| -> Result<Tensor> {
        Ok(if start == 0 && len == keys {
            probs.clone()
        } else {
            probs.narrow(3, start, len)?.contiguous()?
        })
    };
    let mut out = match (step.past, &joined) {
        (_, Some(joined)) => own_weights(shared_len, past_len + seq)?.matmul(&joined.v)?,
        (Some(past), None) => {
            let new = own_weights(shared_len + past_len, seq)?.matmul(v)?;
            (new + own_weights(shared_len, past_len)?.matmul(&past.v)?)?
        }
        (None, None) => own_weights(shared_len, seq)?.matmul(v)?,
    };
    if let Some(shared) = shared {
        let weights = probs.narrow(3, 0, shared_len)?;
        out = (out + shared_matmul(&weights, &shared.kv.v)?)?;
    }
    Ok((out, measured))
}

/// The attention weights `[batch, kv_heads, group * seq, keys]` from the
/// row's own scores `own` (past and new keys) and the shared K/V's, each
/// step on the materialised scores in the accumulation dtype, and what the
/// probe measured. The mask covers the row's own past and the new positions
/// only; the shared K/V, usually the longest segment, is visible to every
/// query.
fn softmax_materialised(
    q: &Tensor,
    own: Tensor,
    shared: Option<&SharedKv>,
    step: &BlockStep,
    (group, seq): (usize, usize),
) -> Result<(Tensor, Option<Tensor>)> {
    let (batch, kv_heads, rows, _) = q.dims4()?;
    let shared_len = shared.map_or(0, |s| s.kv.len());
    let past_len = step.past.map_or(0, LayerKv::len);
    let acc = ops::accumulation_dtype(q.dtype());
    let grouped = |scores: Tensor, keys: usize| -> Result<Tensor> {
        Ok(scores
            .to_dtype(acc)?
            .reshape((batch, kv_heads, group, seq, keys))?)
    };
    let own = grouped(own, past_len + seq)?;
    let own = match step.mask {
        Some(mask) => own.broadcast_add(mask)?,
        None => own,
    };
    let scores = match shared {
        Some(shared) => {
            let mut scores = grouped(shared_matmul(q, &shared.kv.k.t()?)?, shared_len)?;
            if let Some(bias) = &shared.bias {
                let bias = bias
                    .to_dtype(acc)?
                    .reshape((1, kv_heads, 1, 1, shared_len))?;
                scores = scores.broadcast_add(&bias)?;
            }
            Tensor::cat(&[scores, own], 4)?
        }
        None => own,
    };
    let measured = step
        .probe
        .map(|p| p.measure(&scores, shared_len, past_len))
        .transpose()?;
    let probs = ops::softmax_last_dim(&scores, step.kernels)?
        .to_dtype(q.dtype())?
        .reshape((batch, kv_heads, rows, shared_len + past_len + seq))?;
    Ok((probs, measured))
}

/// On CUDA, an inference pass's softmax of its own scores (no shared K/V)
/// with the mask added, in one kernel ([`cuda::masked_softmax`]) instead of
/// four passes over the scores; `None` where the general path is needed.
#[cfg(feature = "cuda")]
fn one_kernel_softmax(
    own: &Tensor,
    shared: Option<&SharedKv>,
    step: &BlockStep,
    seq: usize,
) -> Result<Option<Tensor>> {
    let applies = own.device().is_cuda()
        && own.dtype() != candle_core::DType::F64
        && step.kernels == Kernels::Inference
        && shared.is_none()
        && !own.track_op();
    Ok(applies
        .then(|| super::cuda::masked_softmax(own, step.mask, seq))
        .transpose()?)
}

/// Without CUDA there is no such kernel: see the CUDA build's.
#[cfg(not(feature = "cuda"))]
fn one_kernel_softmax(
    _: &Tensor,
    _: Option<&SharedKv>,
    _: &BlockStep,
    _: usize,
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// The same attention through [`fused::attend`], never materialising
/// the scores: the shared K/V unmasked (with its bias), then the row's past
/// and new positions under the mask.
fn fused_attention(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    shared: Option<&SharedKv>,
    step: &BlockStep,
    seq: usize,
) -> Result<Tensor> {
    let past_len = step.past.map_or(0, LayerKv::len);
    let mut segments = Vec::with_capacity(3);
    if let Some(shared) = shared {
        segments.push(fused::Segment {
            k: &shared.kv.k,
            v: &shared.kv.v,
            bias: shared.bias.as_ref(),
            mask_offset: None,
        });
    }
    if let Some(past) = step.past {
        segments.push(fused::Segment {
            k: &past.k,
            v: &past.v,
            bias: None,
            mask_offset: Some(0),
        });
    }
    segments.push(fused::Segment {
        k,
        v,
        bias: None,
        mask_offset: Some(past_len),
    });
    let mask = step
        .mask
        .map(|m| m.reshape((m.dim(0)?, seq, past_len + seq)))
        .transpose()?;
    Ok(fused::attend(q, &segments, mask.as_ref(), seq, step.bf16)?)
}

/// `x @ m` for `x` of shape `[batch, kv_heads, rows, inner]` and a single-row
/// `m` of shape `[1, kv_heads, inner, cols]` that every row of the batch
/// shares: the batch is folded into the rows, so `m` is read once and never
/// copied per row.
fn shared_matmul(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let (batch, kv_heads, rows, inner) = x.dims4()?;
    if batch == 1 {
        return Ok(x.contiguous()?.matmul(m)?);
    }
    let cols = m.dim(3)?;
    let folded = x
        .transpose(0, 1)?
        .contiguous()?
        .reshape((1, kv_heads, batch * rows, inner))?;
    Ok(folded
        .matmul(m)?
        .reshape((kv_heads, batch, rows, cols))?
        .transpose(0, 1)?
        .contiguous()?)
}
