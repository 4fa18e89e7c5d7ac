//! One transformer block of the decoder: its weights (read by name, the
//! projections packed in bf16 as they load where the model runs so), and
//! its forward pass: RMSNorm, attention ([`super::attention`]) with RoPE,
//! LoRA deltas and the probe, then the gated MLP.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention;
use super::config::ModelConfig;
use super::kv::{LayerKv, SharedKv};
use super::lora::{LayerLora, LowRank};
use super::ops::{self, Kernels};
use super::probe::AttentionProbe;
use super::projection::Projection;
use super::rope::{Rope, RopeTables};
use crate::error::Result;

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    /// Per-head RMSNorm weights on q and k (Qwen3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub(super) struct Block {
    input_layernorm: Tensor,
    attention: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Block `{i}.*` below `vb`; `bf16`: its projections packed as they are read.
pub(super) fn load_block(c: &ModelConfig, vb: &VarBuilder, bf16: bool) -> Result<Block> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let q_dim = c.num_heads * hd;
    let kv_dim = c.num_kv_heads * hd;
    let attn = vb.pp("self_attn");
    let mlp = vb.pp("mlp");
    Ok(Block {
        input_layernorm: vb.get(h, "input_layernorm.weight")?,
        attention: Attention {
            q_proj: linear(&attn, (h, q_dim), c.qkv_bias, "q_proj", bf16)?,
            k_proj: linear(&attn, (h, kv_dim), c.qkv_bias, "k_proj", bf16)?,
            v_proj: linear(&attn, (h, kv_dim), c.qkv_bias, "v_proj", bf16)?,
            o_proj: linear(&attn, (q_dim, h), c.o_bias, "o_proj", bf16)?,
            q_norm: c
                .qk_norm
                .then(|| attn.get(hd, "q_norm.weight"))
                .transpose()?,
            k_norm: c
                .qk_norm
                .then(|| attn.get(hd, "k_norm.weight"))
                .transpose()?,
        },
        post_attention_layernorm: vb.get(h, "post_attention_layernorm.weight")?,
        mlp: Mlp {
            gate_proj: linear(
                &mlp,
                (h, c.intermediate_size),
                c.mlp_bias,
                "gate_proj",
                bf16,
            )?,
            up_proj: linear(&mlp, (h, c.intermediate_size), c.mlp_bias, "up_proj", bf16)?,
            down_proj: linear(
                &mlp,
                (c.intermediate_size, h),
                c.mlp_bias,
                "down_proj",
                bf16,
            )?,
        },
    })
}

/// Projection `name` below `vb`, `in_dim -> out_dim`, packed with `bf16`
/// ([`Projection::new`]).
pub(super) fn linear(
    vb: &VarBuilder,
    (in_dim, out_dim): (usize, usize),
    bias: bool,
    name: &str,
    bf16: bool,
) -> Result<Projection> {
    let vb = vb.pp(name);
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
    Projection::new(weight, bias, bf16)
}

/// What every block of one forward pass shares, plus its own past and LoRA.
pub(super) struct BlockStep<'a> {
    pub(super) tables: &'a RopeTables,
    pub(super) mask: Option<&'a Tensor>,
    pub(super) shared: Option<&'a SharedKv>,
    pub(super) past: Option<&'a LayerKv>,
    pub(super) lora: &'a LayerLora,
    pub(super) probe: Option<&'a AttentionProbe>,
    pub(super) kernels: Kernels,
    /// The model runs bf16 products ([`super::Decoder::bf16_weights`]): the
    /// attention's too, on a prefill.
    pub(super) bf16: bool,
}

/// A block's projections, named as below a model's `layers.{i}`.
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A block's output, the K/V it computed, and what the probe measured.
pub(super) type BlockOutput = (Tensor, LayerKv, Option<Tensor>);

impl Block {
    /// The block's weights and biases, named as below a model's
    /// `layers.{i}` (`input_layernorm.weight`, `self_attn.q_proj.weight`, ...).
    pub(super) fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            (
                "input_layernorm.weight".into(),
                self.input_layernorm.clone(),
            ),
            (
                "post_attention_layernorm.weight".into(),
                self.post_attention_layernorm.clone(),
            ),
        ];
        let a = &self.attention;
        for (name, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(norm) = norm {
                out.push((format!("self_attn.{name}.weight"), norm.clone()));
            }
        }
        for (name, proj) in PROJECTIONS.iter().zip(self.projections()) {
            let linear = proj.linear()?;
            out.push((format!("{name}.weight"), linear.weight().clone()));
            if let Some(bias) = linear.bias() {
                out.push((format!("{name}.bias"), bias.clone()));
            }
        }
        Ok(out)
    }

    /// How many tensors [`Self::named_tensors`] gives, without unpacking.
    pub(super) fn tensor_count(&self) -> usize {
        let a = &self.attention;
        let norms = 2 + usize::from(a.q_norm.is_some()) + usize::from(a.k_norm.is_some());
        let biases = self
            .projections()
            .iter()
            .filter(|p| p.bias().is_some())
            .count();
        norms + PROJECTIONS.len() + biases
    }

    /// The projections, in the order of [`PROJECTIONS`].
    fn projections(&self) -> [&Projection; 7] {
        let (a, m) = (&self.attention, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        c: &ModelConfig,
        step: &BlockStep,
    ) -> Result<BlockOutput> {
        let normed = ops::rms_norm(x, &self.input_layernorm, c.rms_norm_eps, step.kernels)?;
        let (attn, kv, measured) = self.attention.forward(&normed, c, step)?;
        let x = (x + attn)?;
        let normed = ops::rms_norm(
            &x,
            &self.post_attention_layernorm,
            c.rms_norm_eps,
            step.kernels,
        )?;
        let (mlp, lora) = (&self.mlp, step.lora);
        let gate = project(&mlp.gate_proj, lora.gate.as_ref(), &normed, step.kernels)?.silu()?;
        let up = project(&mlp.up_proj, lora.up.as_ref(), &normed, step.kernels)?;
        let y = project(
            &mlp.down_proj,
            lora.down.as_ref(),
            &(gate * up)?,
            step.kernels,
        )?;
        Ok(((x + y)?, kv, measured))
    }
}

fn project(
    proj: &Projection,
    lora: Option<&LowRank>,
    x: &Tensor,
    kernels: Kernels,
) -> Result<Tensor> {
    let base = ops::linear(proj, x, kernels)?;
    match lora {
        Some(lora) => Ok((base + lora.delta(x)?)?),
        None => Ok(base),
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, c: &ModelConfig, step: &BlockStep) -> Result<BlockOutput> {
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = c.group_size();

        let q = project(&self.q_proj, step.lora.q.as_ref(), x, step.kernels)?
            .reshape((batch, seq, heads, hd))?;
        let k = project(&self.k_proj, step.lora.k.as_ref(), x, step.kernels)?
            .reshape((batch, seq, kv_heads, hd))?;
        let v = project(&self.v_proj, step.lora.v.as_ref(), x, step.kernels)?
            .reshape((batch, seq, kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                ops::rms_norm(&q, qn, c.rms_norm_eps, step.kernels)?,
                ops::rms_norm(&k, kn, c.rms_norm_eps, step.kernels)?,
            ),
            _ => (q, k),
        };
        let q = Rope::apply(&q.transpose(1, 2)?, step.tables, step.kernels)?;
        let k = Rope::apply(&k.transpose(1, 2)?, step.tables, step.kernels)?;
        // Grouped-query attention without copying K/V per query head: the
        // `group` query heads that share a KV head are stacked along the
        // sequence axis, [b, kv_heads, group * seq, hd]. The shared K/V, the
        // past and the new positions are attended as segments whose scores
        // share one softmax. The scale is applied to the queries, the
        // smallest operand.
        let rows = group * seq;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (q.reshape((batch, kv_heads, rows, hd))? * scale)?;
        // A layer that keeps nothing of the document has no shared segment.
        let shared = step.shared.filter(|s| !s.kv.is_empty());
        let (out, measured) = attention::attend(&q, (&k, &v), shared, step, (group, seq, hd))?;
        let out = out
            .reshape((batch, heads, seq, hd))?
            .transpose(1, 2)?
            .reshape((batch, seq, heads * hd))?;
        Ok((
            project(&self.o_proj, step.lora.o.as_ref(), &out, step.kernels)?,
            LayerKv { k, v },
            measured,
        ))
    }
}
