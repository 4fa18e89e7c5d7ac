//! The training path: every op has a gradient, and the gradients are right.
//! Checked against central finite differences in f64 for the two kinds of
//! trainable tensors SAC has: an embedding added to the input (the anchor
//! "role" embeddings) and low-rank extra weights on q and v (LoRA).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{Fixture, max_abs_diff};
use sac::model::{
    AttentionMask, AttentionProbe, ForwardInput, Kernels, LayerLora, LowRank, ModelLora, Reduce,
    SharedKv,
};

const RANK: usize = 3;

/// Deterministic values in [-scale, scale) (a small LCG; tests need no RNG crate).
fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn var(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Var {
    let n = shape.iter().product();
    let t = Tensor::from_vec(values(n, seed, scale), shape, &Device::Cpu).unwrap();
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

struct Trainables {
    role: Var,
    lora: Vec<[Var; 4]>,
}

impl Trainables {
    fn new(fx: &Fixture, seq: usize, dtype: DType) -> Self {
        let c = fx.decoder.config();
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let lora = (0..c.num_layers as u64)
            .map(|i| {
                [
                    var(&[h, RANK], 10 + i, 0.3, dtype),
                    var(&[RANK, q_dim], 20 + i, 0.3, dtype),
                    var(&[h, RANK], 30 + i, 0.3, dtype),
                    var(&[RANK, kv_dim], 40 + i, 0.3, dtype),
                ]
            })
            .collect();
        Trainables {
            role: var(&[1, seq, h], 1, 0.5, dtype),
            lora,
        }
    }

    fn qv_lora(&self) -> ModelLora {
        let low_rank = |a: &Var, b: &Var| LowRank {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
        };
        ModelLora {
            layers: self
                .lora
                .iter()
                .map(|[qa, qb, va, vb]| LayerLora {
                    q: Some(low_rank(qa, qb)),
                    v: Some(low_rank(va, vb)),
                    ..LayerLora::default()
                })
                .collect(),
        }
    }

    fn all(&self) -> Vec<&Var> {
        std::iter::once(&self.role)
            .chain(self.lora.iter().flatten())
            .collect()
    }
}

/// Logits and K/V of the fixture prompt with the trainables applied, as SAC's
/// compressor runs it: a bidirectional block, 1-based positions.
fn forward(fx: &Fixture, t: &Trainables, kernels: Kernels) -> (Tensor, Vec<Tensor>) {
    let ids = fx.ids("input_ids");
    let positions = fx.ids("bidir.position_ids");
    let seq = ids.dim(1).unwrap();
    let mask =
        common::causal_with_bidirectional_blocks(seq, &[common::BIDIRECTIONAL_BLOCK], &Device::Cpu)
            .unwrap();
    let embeds = fx
        .decoder
        .embed(&ids)
        .unwrap()
        .broadcast_add(t.role.as_tensor())
        .unwrap();
    let lora = t.qv_lora();
    let out = fx
        .decoder
        .forward(ForwardInput {
            embeds: &embeds,
            positions: &positions,
            mask: AttentionMask::Additive(&mask),
            shared: None,
            past: None,
            lora: Some(&lora),
            kernels,
        })
        .unwrap();
    let kv = out.kv.into_iter().flat_map(|l| [l.k, l.v]).collect();
    (fx.decoder.logits(&out.hidden).unwrap(), kv)
}

/// A scalar that depends on every logit and every K/V element.
fn loss(fx: &Fixture, t: &Trainables, kernels: Kernels) -> Tensor {
    let (logits, kv) = forward(fx, t, kernels);
    let weights = |x: &Tensor, seed| {
        Tensor::from_vec(values(x.elem_count(), seed, 1.0), x.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap()
    };
    let logits = logits.to_dtype(DType::F64).unwrap();
    let mut total = (&logits * weights(&logits, 99)).unwrap().sum_all().unwrap();
    for (i, x) in kv.iter().enumerate() {
        let x = x.to_dtype(DType::F64).unwrap();
        total = (total
            + (&x * weights(&x, 200 + i as u64))
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
    }
    total
}

#[test]
fn training_path_gives_inference_numbers() {
    for name in common::PARITY_MODELS {
        let fx = Fixture::load(name, DType::F32);
        let t = Trainables::new(&fx, fx.ids("input_ids").dim(1).unwrap(), DType::F32);
        let (fast_logits, fast_kv) = forward(&fx, &t, Kernels::Inference);
        let (slow_logits, slow_kv) = forward(&fx, &t, Kernels::Training);
        let d = max_abs_diff(&fast_logits, &slow_logits);
        assert!(d <= 1e-5, "{name}: training-path logits differ by {d}");
        for (a, b) in fast_kv.iter().zip(&slow_kv) {
            assert!(
                max_abs_diff(a, b) <= 1e-5,
                "{name}: training-path K/V differ"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    // qwen3 covers q/k norms, qwen2 biases, llama3 scaled RoPE.
    for name in ["llama3", "qwen2", "qwen3"] {
        let fx = Fixture::load(name, DType::F64);
        let t = Trainables::new(&fx, fx.ids("input_ids").dim(1).unwrap(), DType::F64);
        let grads = loss(&fx, &t, Kernels::Training).backward().unwrap();
        for (k, v) in t.all().into_iter().enumerate() {
            let analytic =
                common::gradient(&grads, v, &format!("{name}: no gradient for trainable {k}"));
            assert!(
                analytic.iter().any(|g| g.abs() > 1e-8),
                "{name}: zero gradient {k}"
            );
            common::check_gradient(&format!("{name}: trainable {k}"), v, &analytic, || {
                loss(&fx, &t, Kernels::Training).to_scalar::<f64>().unwrap()
            });
        }
    }
}

/// Hidden states and probe of one configuration of passes, on `kernels`: a
/// document prefilled causally, read as shared K/V (its last slot hidden
/// from KV head 0 by a bias); a first pass after it that becomes the past of
/// a second, probed pass.
fn shared_past_probe_pass(fx: &Fixture, kernels: Kernels) -> (Tensor, Vec<Tensor>) {
    let ids = fx.ids("input_ids");
    let seq = ids.dim(1).unwrap();
    let half = seq / 2;
    let positions = |from: usize, to: usize| {
        Tensor::arange(from as u32, to as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let pass = |ids: &Tensor, at: &Tensor, shared, past, probe: Option<&AttentionProbe>| {
        let embeds = fx.decoder.embed(ids).unwrap();
        let input = ForwardInput {
            shared,
            past,
            kernels,
            ..ForwardInput::causal(&embeds, at)
        };
        match probe {
            Some(probe) => fx.decoder.forward_probed(input, probe),
            None => fx.decoder.forward(input),
        }
        .unwrap()
    };
    let document = ids.narrow(1, 0, half).unwrap();
    let rest = ids.narrow(1, half, seq - half).unwrap();
    let doc = pass(&document, &positions(1, half + 1), None, None, None);
    let shared: Vec<SharedKv> = doc
        .kv
        .into_iter()
        .map(|kv| {
            let kv_heads = kv.k.dim(1).unwrap();
            let bias: Vec<f32> = (0..kv_heads * half)
                .map(|i| {
                    if i == half - 1 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            SharedKv {
                kv,
                bias: Some(Tensor::from_vec(bias, (kv_heads, half), &Device::Cpu).unwrap()),
            }
        })
        .collect();
    let first = pass(
        &rest,
        &positions(half + 1, seq + 1),
        Some(&shared),
        None,
        None,
    );
    let probe = AttentionProbe {
        sinks: 1,
        keys: 2..(seq - half).min(5),
        reduce: Reduce::Max,
    };
    let second = pass(
        &rest,
        &positions(seq + 1, seq + 1 + rest.dim(1).unwrap()),
        Some(&shared),
        Some(&first.kv),
        Some(&probe),
    );
    (second.hidden, second.attention)
}

#[test]
fn fused_attention_gives_the_materialised_paths_numbers() {
    for name in common::PARITY_MODELS {
        let fx = Fixture::load(name, DType::F32);
        let (fused, fused_probe) = shared_past_probe_pass(&fx, Kernels::Inference);
        let (plain, plain_probe) = shared_past_probe_pass(&fx, Kernels::Training);
        let d = max_abs_diff(&fused, &plain);
        assert!(
            d <= 1e-5,
            "{name}: fused attention's hidden states differ by {d}"
        );
        assert_eq!(fused_probe.len(), plain_probe.len());
        for (a, b) in fused_probe.iter().zip(&plain_probe) {
            let d = max_abs_diff(a, b);
            assert!(d <= 1e-5, "{name}: fused attention's probe differs by {d}");
        }
    }
}
