//! Attention weights a forward pass reports on some of its past keys, for the
//! training-free selectors (KVzip, SnapKV) that rank cached K/V by how much
//! later queries look at them. Measured from the pass's own masked attention
//! scores, so the probe and the forward pass cannot disagree.

use std::ops::Range;

use candle_core::{DType, Tensor};

use super::cpu;
use super::kv::LayerKv;
use super::ops::{self, Kernels};
use crate::error::{InputError, Result};

/// How the weights of all query rows (every row of the batch, every query
/// head of a GQA group, every position of the pass) fold into one number per
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// The largest weight any query puts on the key (KVzip).
    Max,
    /// The mean weight (SnapKV).
    Mean,
}

/// Which past keys a pass reports on, and over which keys the reported
/// weights are normalized.
///
/// The probe's softmax runs over the past keys `0..sinks`, the past keys in
/// `keys`, and the pass's own keys (masked as the pass masks them); other
/// past keys are left out of it. With `sinks == 0` and `keys` the whole past,
/// these are the pass's own attention weights. KVzip scores a chunk of the
/// context against the sinks, that chunk and the repeat tokens only
/// (`KVScore._get_score` in snu-mllab/KVzip `attention/score.py`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionProbe {
    pub sinks: usize,
    /// Past keys reported on; `sinks <= keys.start`.
    pub keys: Range<usize>,
    pub reduce: Reduce,
}

impl AttentionProbe {
    /// Refuses a probe that does not fit a past of `past_len` keys.
    pub(crate) fn check(&self, past_len: usize) -> Result<()> {
        if self.sinks > self.keys.start || self.keys.start > self.keys.end {
            return Err(InputError::ProbeOverlap {
                sinks: self.sinks,
                keys: self.keys.clone(),
            }
            .into());
        }
        if self.keys.end > past_len {
            return Err(InputError::ProbePastKeys {
                keys: self.keys.clone(),
                past: past_len,
            }
            .into());
        }
        Ok(())
    }

    /// The reported weights `[kv_heads, keys.len()]` (f32 or f64) from a
    /// layer's masked scores `[batch, kv_heads, group, seq, keys]`, whose key
    /// axis holds `shared` keys, then `past` keys, then the pass's own.
    pub(crate) fn measure(&self, scores: &Tensor, shared: usize, past: usize) -> Result<Tensor> {
        let own = scores.dim(4)? - shared - past;
        let parts = self
            .columns(past, own)
            .map(|(start, len)| scores.narrow(4, shared + start, len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.fold(&parts)
    }

    /// The same weights for a pass whose attention never materialised its
    /// scores: only the columns the probe's softmax reads are computed, from
    /// the scaled queries `[batch, kv_heads, group * seq, head_dim]`, the
    /// past and new keys, and the pass's mask `[1 or batch, 1, 1, seq,
    /// past + seq]`.
    pub(crate) fn measure_from_keys(
        &self,
        q: &Tensor,
        past: Option<&LayerKv>,
        new_k: &Tensor,
        mask: Option<&Tensor>,
        (group, seq): (usize, usize),
    ) -> Result<Tensor> {
        let (batch, kv_heads, _, _) = q.dims4()?;
        let acc = ops::accumulation_dtype(q.dtype());
        let parts = self
            .column_keys(past, new_k, seq)?
            .into_iter()
            .map(|(start, keys)| -> Result<Tensor> {
                let len = keys.dim(2)?;
                let scores = q
                    .matmul(&keys.t()?)?
                    .to_dtype(acc)?
                    .reshape((batch, kv_heads, group, seq, len))?;
                Ok(match mask {
                    Some(mask) => scores.broadcast_add(&mask.narrow(4, start, len)?)?,
                    None => scores,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.fold(&parts)
    }

    /// [`AttentionProbe::measure_from_keys`] by the CPU kernel
    /// ([`cpu::probe`]) for f32 queries on the CPU: one pass over each block
    /// of query rows instead of candle's ops on `[heads, rows, columns]`.
    pub(crate) fn measure_on_cpu(
        &self,
        q: &Tensor,
        past: Option<&LayerKv>,
        new_k: &Tensor,
        mask: Option<&Tensor>,
        seq: usize,
        bf16: bool,
    ) -> Result<Tensor> {
        if self.keys.is_empty() {
            return Ok(Tensor::zeros((q.dim(1)?, 0), DType::F32, q.device())?);
        }
        let past_len = past.map_or(0, LayerKv::len);
        let keys = self.column_keys(past, new_k, seq)?;
        let runs: Vec<cpu::probe::Columns> = keys
            .iter()
            .map(|(start, k)| cpu::probe::Columns {
                k,
                mask_offset: *start,
            })
            .collect();
        // The reported keys come after the sinks, if there are any.
        let reported = usize::from(self.sinks > 0);
        let mask = mask
            .map(|m| m.reshape((m.dim(0)?, seq, past_len + seq)))
            .transpose()?;
        Ok(cpu::probe::measure(
            q,
            &runs,
            reported,
            mask.as_ref(),
            seq,
            self.reduce,
            bf16,
        )?)
    }

    /// The keys of [`AttentionProbe::columns`] with where each run starts:
    /// narrowed from the past, or the pass's own `new_k`.
    fn column_keys(
        &self,
        past: Option<&LayerKv>,
        new_k: &Tensor,
        seq: usize,
    ) -> Result<Vec<(usize, Tensor)>> {
        let past_len = past.map_or(0, LayerKv::len);
        self.columns(past_len, seq)
            .map(|(start, len)| {
                Ok(match past {
                    Some(past) if start < past_len => (start, past.k.narrow(2, start, len)?),
                    _ => (start, new_k.clone()),
                })
            })
            .collect()
    }

    /// The probe's columns among a pass's past and own keys, `(start, len)`
    /// counted from the first past key: the sinks, the keys reported on,
    /// the pass's own keys.
    fn columns(&self, past: usize, own: usize) -> impl Iterator<Item = (usize, usize)> {
        [
            (0, self.sinks),
            (self.keys.start, self.keys.len()),
            (past, own),
        ]
        .into_iter()
        .filter(|&(_, len)| len > 0)
    }

    /// Softmax over the masked score columns `[batch, kv_heads, group, seq,
    /// _]` of [`AttentionProbe::columns`], taken on the reported keys and
    /// folded to `[kv_heads, keys.len()]`.
    fn fold(&self, parts: &[Tensor]) -> Result<Tensor> {
        let probs = ops::softmax_last_dim(&Tensor::cat(parts, 4)?, Kernels::Inference)?.narrow(
            4,
            self.sinks,
            self.keys.len(),
        )?;
        let fold = |t: &Tensor, dim: usize| -> Result<Tensor> {
            Ok(match self.reduce {
                Reduce::Max => t.max(dim)?,
                Reduce::Mean => t.mean(dim)?,
            })
        };
        // [batch, kv_heads, group, seq, n] -> [kv_heads, n]
        fold(&fold(&fold(&probs, 3)?, 2)?, 0)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::cpu::attention::tests::random;

    /// The CPU kernel reports what candle's ops on the same columns do:
    /// two batch rows with masks of their own, GQA groups, blocks of rows
    /// that do not divide the pass, sinks, both folds, f32 and bf16 scores.
    #[test]
    fn cpu_kernel_measures_what_candles_ops_do() -> Result<()> {
        let (batch, kv_heads, group, seq, hd, past_len) = (2, 2, 3, 45, 16, 100);
        let q = random(&[batch, kv_heads, group * seq, hd], 11);
        let past = LayerKv {
            k: random(&[batch, kv_heads, past_len, hd], 12),
            v: random(&[batch, kv_heads, past_len, hd], 13),
        };
        let new_k = random(&[batch, kv_heads, seq, hd], 14);
        let keys = past_len + seq;
        // Causal over the new positions; the second row hides part of its past.
        let mask: Vec<f32> = (0..batch * seq * keys)
            .map(|i| {
                let (b, s, key) = (i / (seq * keys), i / keys % seq, i % keys);
                let hidden = key > past_len + s || (b == 1 && (10..30).contains(&key));
                if hidden { f32::NEG_INFINITY } else { 0.0 }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (batch, 1, 1, seq, keys), &Device::Cpu)?;
        for (sinks, reported, reduce) in [
            (4, 20..90, Reduce::Max),
            (4, 20..90, Reduce::Mean),
            (0, 0..past_len, Reduce::Max),
            (2, 50..50, Reduce::Mean),
        ] {
            let probe = AttentionProbe {
                sinks,
                keys: reported.clone(),
                reduce,
            };
            // bf16 products (where the CPU has them) round the queries and keys.
            let precisions = [(false, 1e-6), (true, 5e-3)];
            let precisions = &precisions[..1 + usize::from(cpu::bf16::available())];
            for (mask, &(bf16, tolerance)) in [Some(&mask), None]
                .into_iter()
                .flat_map(|m| precisions.iter().map(move |p| (m, p)))
            {
                let got = probe.measure_on_cpu(&q, Some(&past), &new_k, mask, seq, bf16)?;
                let want = probe.measure_from_keys(&q, Some(&past), &new_k, mask, (group, seq))?;
                assert_eq!(got.dims(), [kv_heads, reported.len()]);
                if reported.is_empty() {
                    continue;
                }
                let (got, want) = (got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?);
                for (g, w) in got.iter().zip(want.to_vec1::<f32>()?) {
                    // Written so that a NaN fails too.
                    let close = (g - w).abs() < tolerance;
                    assert!(
                        close,
                        "{sinks} sinks, {reported:?}, {reduce:?}, bf16 {bf16}: {g} for {w}"
                    );
                }
            }
        }
        Ok(())
    }
}
