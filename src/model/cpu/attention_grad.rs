//! Training's attention on the CPU: the forward pass by the tiled kernel
//! ([`super::attention::attend`]), which never materialises the scores, and
//! a backward pass that recomputes them one layer at a time. Through
//! candle's ops, a training step keeps every layer's scores, probabilities
//! and their gradients alive until the backward pass reaches that layer (for
//! SAC's 510-token chunks on SmolLM2, most of a step's memory); here a
//! layer keeps only its output.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor};

use super::attention::{Segment, attend};

/// `softmax(q k^T + mask) v` with a gradient for `q`, `k` and `v`: `q` is
/// `[batch, kv_heads, group * seq, head_dim]` and already scaled (row `r`
/// is position `r % seq`), `k` and `v` `[batch, kv_heads, keys, head_dim]`,
/// `mask` additive and `[1 or batch, seq, keys]`. A row whose every key is
/// masked gives zeros, and no gradient.
pub fn attend_differentiable(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    mask: Option<&Tensor>,
    seq: usize,
) -> Result<Tensor> {
    if k.dim(0)? != q.dim(0)? {
        candle_core::bail!("attention-recomputed: keys and queries of different batch sizes");
    }
    let segment = Segment {
        k,
        v,
        bias: None,
        mask_offset: Some(0),
    };
    let out = attend(q, &[segment], mask, seq, false)?;
    if ![q, k, v].iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        Recomputed {
            out: Mutex::new(Some(out)),
            mask: mask.map(|m| m.to_dtype(DType::F32)).transpose()?,
            seq,
        },
    )
}

/// The op whose forward pass hands back the kernel's output and whose
/// backward pass recomputes the probabilities.
struct Recomputed {
    /// Taken by the forward pass, so that only the graph's copy lives on.
    out: Mutex<Option<Tensor>>,
    mask: Option<Tensor>,
    seq: usize,
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        "attention-recomputed"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        _q_layout: &Layout,
        _k: &CpuStorage,
        _k_layout: &Layout,
        _v: &CpuStorage,
        _v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(out) = out else {
            candle_core::bail!("attention-recomputed: the forward pass ran twice")
        };
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(out) => Ok((out.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attention-recomputed: the output is not on the CPU"),
        }
    }

    /// With `P = softmax(S)`, `S = q k^T + mask`, `out = P v` and `g` the
    /// output's gradient: `dv = P^T g`, `dS = P * (g v^T - rowsum(g * out))`,
    /// `dq = dS k`, `dk = dS^T q`. The rows of a KV head's query group all
    /// read the same keys, so the products over rows sum the group.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (batch, kv_heads, rows, _) = q.dims4()?;
        let keys = k.dim(2)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = &self.mask {
            let group = rows / self.seq;
            scores = scores
                .reshape((batch, kv_heads, group, self.seq, keys))?
                .broadcast_add(&mask.unsqueeze(1)?.unsqueeze(1)?)?
                .reshape((batch, kv_heads, rows, keys))?;
        }
        let mut probs = candle_nn::ops::softmax_last_dim(&scores)?;
        drop(scores);
        if self.mask.is_some() {
            // A row with every key masked is NaN here and zero in the forward pass.
            let zero =
                Tensor::zeros((), probs.dtype(), probs.device())?.broadcast_as(probs.shape())?;
            probs = probs.eq(&probs)?.where_cond(&probs, &zero)?;
        }
        let grad = grad.detach().contiguous()?;
        let dv = probs.t()?.matmul(&grad)?;
        let dot = (&grad * out.detach())?.sum_keepdim(D::Minus1)?;
        let ds = (probs * grad.matmul(&v.t()?)?.broadcast_sub(&dot)?)?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::cpu;
    use candle_core::{Device, Var};

    use super::*;
    use crate::model::cpu::attention::tests::{random, reference};

    /// The gradients of `sum(out * weights)` with respect to `q`, `k`, `v`.
    fn grads(out: &Tensor, weights: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
        let store = (out * weights)?.sum_all()?.backward()?;
        vars.iter()
            .map(|v| {
                let missing =
                    || candle_core::Error::Msg(format!("no gradient for {:?}", v.shape()));
                store.get(v.as_tensor()).cloned().ok_or_else(missing)
            })
            .collect()
    }

    #[test]
    fn gradients_match_the_materialised_attention() -> Result<()> {
        let (batch, kv_heads, group, seq, hd) = (2, 2, 3, 70, 16);
        let q = Var::from_tensor(&random(&[batch, kv_heads, group * seq, hd], 11))?;
        let k = Var::from_tensor(&random(&[batch, kv_heads, seq, hd], 12))?;
        let v = Var::from_tensor(&random(&[batch, kv_heads, seq, hd], 13))?;
        let weights = random(&[batch, kv_heads, group * seq, hd], 14);
        // Causal, and the second row also hides its first five keys.
        let causal: Vec<f32> = (0..batch * seq * seq)
            .map(|i| {
                let (b, s, key) = (i / (seq * seq), i / seq % seq, i % seq);
                let hidden = key > s || (b == 1 && key < 5 && s >= 5);
                if hidden { f32::NEG_INFINITY } else { 0.0 }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (batch, seq, seq), &Device::Cpu)?;
        let vars = [&q, &k, &v];
        for mask in [Some(&causal), None] {
            let segment = Segment {
                k: k.as_tensor(),
                v: v.as_tensor(),
                bias: None,
                mask_offset: Some(0),
            };
            let want_out = reference(q.as_tensor(), &[segment], mask, seq)?;
            let want = grads(&want_out, &weights, &vars)?;
            let out =
                attend_differentiable(q.as_tensor(), (k.as_tensor(), v.as_tensor()), mask, seq)?;
            let diff = cpu::max_abs_diff(&out, &want_out)?;
            assert!(diff < 1e-5, "output: largest difference {diff}");
            for (name, (got, want)) in ["q", "k", "v"]
                .iter()
                .zip(grads(&out, &weights, &vars)?.iter().zip(&want))
            {
                let diff = cpu::max_abs_diff(got, want)?;
                assert!(diff < 1e-4, "gradient of {name}: largest difference {diff}");
            }
        }
        let frozen = random(&[1, 1, seq, hd], 15);
        let out = attend_differentiable(&frozen, (&frozen, &frozen), None, seq)?;
        assert!(!out.track_op());
        Ok(())
    }

    /// A query row that may read no key gives zeros and no gradient, and
    /// leaves the other rows' gradients finite.
    #[test]
    fn a_fully_masked_row_has_no_gradient() -> Result<()> {
        let (seq, hd) = (6, 8);
        let q = Var::from_tensor(&random(&[1, 1, seq, hd], 21))?;
        let k = Var::from_tensor(&random(&[1, 1, seq, hd], 22))?;
        let v = Var::from_tensor(&random(&[1, 1, seq, hd], 23))?;
        // Causal, and row 0 also hides its own key: it reads nothing.
        let mask: Vec<f32> = (0..seq * seq)
            .map(|i| {
                let (row, key) = (i / seq, i % seq);
                if key > row || row == 0 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, seq, seq), &Device::Cpu)?;
        let out = attend_differentiable(
            q.as_tensor(),
            (k.as_tensor(), v.as_tensor()),
            Some(&mask),
            seq,
        )?;
        let weights = random(&[1, 1, seq, hd], 24);
        let [dq, dk, dv]: [Tensor; 3] = grads(&out, &weights, &[&q, &k, &v])?
            .try_into()
            .expect("three gradients");
        let first_row =
            |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.narrow(0, 0, hd)?.to_vec1() };
        assert!(first_row(&out)?.iter().all(|&x| x == 0.0));
        assert!(first_row(&dq)?.iter().all(|&x| x == 0.0));
        for g in [&dq, &dk, &dv] {
            let values: Vec<f32> = g.flatten_all()?.to_vec1()?;
            assert!(values.iter().all(|x| x.is_finite()), "{values:?}");
        }
        Ok(())
    }
}
