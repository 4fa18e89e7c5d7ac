//! A brute-force reference for the selectors, sharing no code with the
//! decoder's attention or the selectors: the model's weights read from its
//! safetensors, one causal pass over a whole sequence with plain tensor ops
//! (only RoPE is the decoder's, checked against transformers by the parity
//! tests), every layer's full attention logits, then each selector's scores
//! and its top-k by explicit loops.

use std::collections::HashMap;

use candle_core::{D, Device, Tensor};
use sac::runtime::LoadedModel;

use crate::common::fixture_dir;

/// Attention logits `[layer][query head][row][column]`, causal (`-inf`
/// above the diagonal).
pub type Logits = Vec<Vec<Vec<Vec<f32>>>>;

pub struct Reference<'m> {
    model: &'m LoadedModel,
    weights: HashMap<String, Tensor>,
}

impl<'m> Reference<'m> {
    pub fn new(name: &str, model: &'m LoadedModel) -> Self {
        let path = fixture_dir(name).join("model.safetensors");
        let weights = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        Reference { model, weights }
    }

    fn weight(&self, layer: usize, name: &str) -> Option<&Tensor> {
        self.weights.get(&format!("model.layers.{layer}.{name}"))
    }

    /// `x @ W^T + b` for the layer's projection `name`.
    fn linear(&self, x: &Tensor, layer: usize, name: &str) -> Tensor {
        let w = self.weight(layer, &format!("{name}.weight")).unwrap();
        let y = x.matmul(&w.t().unwrap()).unwrap();
        match self.weight(layer, &format!("{name}.bias")) {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let eps = self.model.config.rms_norm_eps;
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(weight)
            .unwrap()
    }

    /// `[heads, t, dim]` for `[t, heads * dim]`, with the layer's per-head
    /// norm (Qwen3) and RoPE at positions 1..=t.
    fn heads(&self, x: Tensor, heads: usize, norm: Option<&Tensor>) -> Tensor {
        let (t, _) = x.dims2().unwrap();
        let dim = self.model.config.head_dim;
        let x = x.reshape((t, heads, dim)).unwrap().transpose(0, 1).unwrap();
        let x = match norm {
            Some(w) => self.rms_norm(&x, w),
            None => x,
        };
        let positions = Tensor::arange(1u32, t as u32 + 1, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        self.model
            .decoder
            .rotate(&x.unsqueeze(0).unwrap().contiguous().unwrap(), &positions)
            .unwrap()
            .squeeze(0)
            .unwrap()
    }

    /// Every layer's attention logits of one causal pass over `ids`.
    pub fn logits(&self, ids: &[u32]) -> Logits {
        let c = &self.model.config;
        let t = ids.len();
        let group = c.num_heads / c.num_kv_heads;
        let embed = &self.weights["model.embed_tokens.weight"];
        let mut x = embed
            .index_select(&Tensor::new(ids, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let causal: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (t, t), &Device::Cpu).unwrap();
        let mut all = Vec::new();
        for l in 0..c.num_layers {
            let xn = self.rms_norm(&x, self.weight(l, "input_layernorm.weight").unwrap());
            let q = self.heads(
                self.linear(&xn, l, "self_attn.q_proj"),
                c.num_heads,
                self.weight(l, "self_attn.q_norm.weight"),
            );
            let k = self.heads(
                self.linear(&xn, l, "self_attn.k_proj"),
                c.num_kv_heads,
                self.weight(l, "self_attn.k_norm.weight"),
            );
            let v = self
                .linear(&xn, l, "self_attn.v_proj")
                .reshape((t, c.num_kv_heads, c.head_dim))
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            // Query head h reads KV head h / group.
            let per_query = |kv: &Tensor| {
                let heads: Vec<Tensor> = (0..c.num_heads)
                    .map(|h| kv.get(h / group).unwrap())
                    .collect();
                Tensor::stack(&heads, 0).unwrap().contiguous().unwrap()
            };
            let logits = (q
                .contiguous()
                .unwrap()
                .matmul(&per_query(&k).t().unwrap())
                .unwrap()
                / (c.head_dim as f64).sqrt())
            .unwrap()
            .broadcast_add(&causal)
            .unwrap();
            all.push(logits.to_vec3::<f32>().unwrap());
            let max = logits.max_keepdim(D::Minus1).unwrap();
            let e = logits.broadcast_sub(&max).unwrap().exp().unwrap();
            let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            let out = probs
                .matmul(&per_query(&v))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((t, c.num_heads * c.head_dim))
                .unwrap();
            x = (x + self.linear(&out, l, "self_attn.o_proj")).unwrap();
            let xn = self.rms_norm(
                &x,
                self.weight(l, "post_attention_layernorm.weight").unwrap(),
            );
            let gate = self.linear(&xn, l, "mlp.gate_proj");
            let gate = (&gate * candle_nn::ops::sigmoid(&gate).unwrap()).unwrap();
            let up = self.linear(&xn, l, "mlp.up_proj");
            x = (x + self.linear(&(gate * up).unwrap(), l, "mlp.down_proj")).unwrap();
        }
        all
    }
}

/// Softmax of `row` over the columns `cols` only, by column.
pub fn softmax_over(row: &[f32], cols: &[usize]) -> HashMap<usize, f32> {
    let max = cols
        .iter()
        .map(|&j| row[j])
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = cols.iter().map(|&j| (row[j] - max).exp()).sum();
    cols.iter()
        .map(|&j| (j, (row[j] - max).exp() / sum))
        .collect()
}

/// Scores `[layer][kv head][position]` of a context.
pub type Scores = Vec<Vec<Vec<f32>>>;

/// KVzip's score of the positions `chunk` of a context of `len` tokens from
/// the logits of one pass over the context followed by the repeat input:
/// each repeat query's softmax over the `sinks` first keys, the chunk and the
/// repeat tokens up to itself, maxed over queries and over each KV head's
/// query heads.
pub fn kvzip_chunk(
    logits: &Logits,
    scores: &mut Scores,
    len: usize,
    sinks: usize,
    chunk: std::ops::Range<usize>,
    group: usize,
) {
    for (layer, heads) in logits.iter().enumerate() {
        for (query_head, rows) in heads.iter().enumerate() {
            let kv_head = query_head / group;
            for (i, row) in rows.iter().enumerate().skip(len) {
                let cols: Vec<usize> = (0..sinks).chain(chunk.clone()).chain(len..=i).collect();
                let probs = softmax_over(row, &cols);
                for p in chunk.clone() {
                    let s = &mut scores[layer][kv_head][p];
                    *s = s.max(probs[&p]);
                }
            }
        }
    }
}

/// SnapKV's score of the positions before the last `window` of a context:
/// the window queries' attention (softmax over every key up to themselves),
/// averaged over the window and each KV head's query heads, then smoothed by
/// a zero-padded average pool of width 5.
pub fn snapkv(logits: &Logits, kv_heads: usize, window: usize) -> Scores {
    let len = logits[0][0].len();
    let observed = len - window;
    let group = logits[0].len() / kv_heads;
    logits
        .iter()
        .map(|heads| {
            (0..kv_heads)
                .map(|kv_head| {
                    let mut mean = vec![0f32; len];
                    for rows in &heads[kv_head * group..(kv_head + 1) * group] {
                        for (i, row) in rows.iter().enumerate().skip(observed) {
                            let probs = softmax_over(row, &(0..=i).collect::<Vec<_>>());
                            for (p, m) in mean.iter_mut().enumerate().take(observed) {
                                *m += probs[&p] / (window * group) as f32;
                            }
                        }
                    }
                    (0..len)
                        .map(|p| match p < observed {
                            true => {
                                let from = p.saturating_sub(2);
                                let to = (p + 3).min(observed);
                                mean[from..to].iter().sum::<f32>() / 5.0
                            }
                            false => 0.0,
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The reference choice: the `forced` positions for every head, then the
/// best `budget` minus forced (layer, head, position) triples by score,
/// earlier position, lower layer, lower head. Also returns the gap between
/// the last kept and the first dropped score, to show the boundary is no
/// near-tie that rounding could flip.
pub fn top_k(
    scores: &Scores,
    forced: std::ops::Range<usize>,
    budget: usize,
) -> (Vec<Vec<Vec<usize>>>, f32) {
    let mut ranked = Vec::new();
    for (layer, heads) in scores.iter().enumerate() {
        for (head, row) in heads.iter().enumerate() {
            for (p, &s) in row.iter().enumerate() {
                if !forced.contains(&p) {
                    ranked.push((s, p, layer, head));
                }
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let rest = budget.saturating_sub(forced.len() * scores.len() * scores[0].len());
    let gap = match (rest.checked_sub(1).map(|i| ranked[i]), ranked.get(rest)) {
        (Some(last), Some(next)) => last.0 - next.0,
        _ => f32::INFINITY,
    };
    let mut kept: Vec<Vec<Vec<usize>>> = scores
        .iter()
        .map(|heads| heads.iter().map(|_| forced.clone().collect()).collect())
        .collect();
    for &(_, p, layer, head) in &ranked[..rest.min(ranked.len())] {
        kept[layer][head].push(p);
    }
    for set in kept.iter_mut().flatten() {
        set.sort_unstable();
    }
    (kept, gap)
}
