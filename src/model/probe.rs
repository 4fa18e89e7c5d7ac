//! Attention weights a forward pass reports on some of its past keys, for the
//! training-free selectors (KVzip, SnapKV) that rank cached K/V by how much
//! later queries look at them. Measured from the pass's own masked attention
//! scores, so the probe and the forward pass cannot disagree.

use std::ops::Range;

use candle_core::Tensor;

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
        let total = scores.dim(4)?;
        let own = total - shared - past;
        let n = self.keys.len();
        let parts = [
            (shared, self.sinks),
            (shared + self.keys.start, n),
            (shared + past, own),
        ]
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(start, len)| scores.narrow(4, start, len))
        .collect::<candle_core::Result<Vec<_>>>()?;
        let probs = ops::softmax_last_dim(&Tensor::cat(&parts, 4)?, Kernels::Inference)?
            .narrow(4, self.sinks, n)?;
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
