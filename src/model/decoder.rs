//! The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3.
//!
//! candle-transformers' models keep their KV cache private, accept no general
//! mask and return only the last position; SAC needs all three (anchors read
//! out of a bidirectional pass, a decoder whose past is a loaded .sack), so
//! this file is our own forward pass, written after candle's `llama.rs` and
//! transformers' `modeling_llama.py`. The four families differ only in the
//! switches of [`ModelConfig`] (biases, q/k norms, RoPE scaling), hence one file.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::attention;
use super::config::ModelConfig;
use super::kv::{LayerKv, SharedKv};
use super::lora::{LayerLora, LowRank, ModelLora};
use super::mask::{self, AttentionMask};
use super::ops::{self, Kernels};
use super::probe::AttentionProbe;
use super::projection::Projection;
use super::rope::{Rope, RopeTables};
use crate::error::{InputError, Result};

/// One forward pass's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// Input embeddings `[batch, seq, hidden]` in the model's dtype: token
    /// embeddings from [`Decoder::embed`], possibly with anchor embeddings
    /// added, or soft tokens.
    pub embeds: &'a Tensor,
    /// Position ids `[batch, seq]` (u32), any values: SAC uses 1-based global ids.
    pub positions: &'a Tensor,
    pub mask: AttentionMask<'a>,
    /// Every layer's K/V that all rows of the batch read in full, unmasked
    /// (a loaded document): one copy however many rows ask about it.
    pub shared: Option<&'a [SharedKv]>,
    /// Every layer's K/V from earlier passes of each row,
    /// `[batch, kv_heads, past, head_dim]`; the mask covers these and the new
    /// positions.
    pub past: Option<&'a [LayerKv]>,
    /// LoRA on the layers' projections (SAC's compressor, GMSA's encoder);
    /// `None` for the frozen decoder.
    pub lora: Option<&'a ModelLora>,
    pub kernels: Kernels,
}

impl<'a> ForwardInput<'a> {
    /// A causal inference pass over `embeds` at `positions`: no shared K/V,
    /// no past, no LoRA; set the fields a pass needs beyond that.
    pub fn causal(embeds: &'a Tensor, positions: &'a Tensor) -> Self {
        ForwardInput {
            embeds,
            positions,
            mask: AttentionMask::Causal,
            shared: None,
            past: None,
            lora: None,
            kernels: Kernels::Inference,
        }
    }
}

/// One forward pass's results, owned by the caller.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Hidden states after the final norm, `[batch, seq, hidden]`.
    pub hidden: Tensor,
    /// The K/V this pass computed (not including the past), one per layer.
    pub kv: Vec<LayerKv>,
    /// Per layer, what the probe measured, `[kv_heads, keys]` in the
    /// accumulation dtype; empty unless the pass ran with a probe
    /// ([`Decoder::forward_probed`]).
    pub attention: Vec<Tensor>,
}

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

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    attention: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Transformer blocks with weights of their own, run with a [`Decoder`]'s
/// rotary embedding and final norm ([`Decoder::forward_with`]): GMSA's
/// layer-semantic-alignment block, a trained copy of the model's first
/// layers.
#[derive(Debug, Clone)]
pub struct Layers {
    blocks: Vec<Block>,
}

impl Layers {
    /// `count` blocks of the shape `config` describes, block `i` named
    /// `{i}.*` below `vb` (as a model's `layers.{i}.*` below `layers`).
    pub fn load(config: &ModelConfig, vb: VarBuilder, count: usize) -> Result<Self> {
        let blocks = (0..count)
            .map(|i| load_block(config, &vb.pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Layers { blocks })
    }

    /// The weight and bias tensors the blocks hold.
    pub fn tensor_count(&self) -> usize {
        self.blocks.iter().map(Block::tensor_count).sum()
    }
}

fn load_block(c: &ModelConfig, vb: &VarBuilder) -> Result<Block> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let q_dim = c.num_heads * hd;
    let kv_dim = c.num_kv_heads * hd;
    let attn = vb.pp("self_attn");
    let mlp = vb.pp("mlp");
    Ok(Block {
        input_layernorm: vb.get(h, "input_layernorm.weight")?,
        attention: Attention {
            q_proj: linear(&attn, h, q_dim, c.qkv_bias, "q_proj")?,
            k_proj: linear(&attn, h, kv_dim, c.qkv_bias, "k_proj")?,
            v_proj: linear(&attn, h, kv_dim, c.qkv_bias, "v_proj")?,
            o_proj: linear(&attn, q_dim, h, c.o_bias, "o_proj")?,
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
            gate_proj: linear(&mlp, h, c.intermediate_size, c.mlp_bias, "gate_proj")?,
            up_proj: linear(&mlp, h, c.intermediate_size, c.mlp_bias, "up_proj")?,
            down_proj: linear(&mlp, c.intermediate_size, h, c.mlp_bias, "down_proj")?,
        },
    })
}

/// A loaded decoder model.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: ModelConfig,
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Projection,
    rope: Rope,
    dtype: DType,
    device: Device,
}

fn linear(
    vb: &VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    name: &str,
) -> Result<Projection> {
    let vb = vb.pp(name);
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
    Ok(Linear::new(weight, bias).into())
}

impl Decoder {
    /// Builds the model from weights named as in transformers checkpoints
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...).
    pub fn load(config: ModelConfig, vb: VarBuilder) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let model = vb.pp("model");
        let embed_weight = model.get((c.vocab_size, h), "embed_tokens.weight")?;
        let embed_tokens = Embedding::new(embed_weight.clone(), h);
        let blocks = Layers::load(c, model.pp("layers"), c.num_layers)?.blocks;
        let lm_head = if c.tie_word_embeddings {
            Linear::new(embed_weight, None).into()
        } else {
            linear(&vb, h, c.vocab_size, false, "lm_head")?
        };
        Ok(Decoder {
            rope: Rope::new(c, vb.device())?,
            norm: model.get(h, "norm.weight")?,
            embed_tokens,
            blocks,
            lm_head,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Layer `index`'s weights and biases, named as below the model's
    /// `layers.{index}` (what [`Layers::load`] reads for one block).
    /// A packed bf16 weight comes back in f32.
    pub fn layer_tensors(&self, index: usize) -> Result<Vec<(String, Tensor)>> {
        self.blocks
            .get(index)
            .map_or_else(|| Ok(Vec::new()), Block::named_tensors)
    }

    /// Whether the projections' weights are packed bf16 ([`Self::pack_bf16`]).
    pub fn bf16_weights(&self) -> bool {
        self.lm_head.bf16().is_some()
    }

    /// Packs every projection's weight, the head's included, in bf16 for
    /// the CPU kernel ([`super::cpu::bf16`]); the activations, norms,
    /// embeddings and K/V stay in the model's dtype (f32).
    pub fn pack_bf16(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            for proj in block.projections_mut() {
                *proj = proj.packed_bf16()?;
            }
        }
        self.lm_head = self.lm_head.packed_bf16()?;
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `[batch, seq, hidden]` for ids `[batch, seq]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    /// Logits for hidden states `[..., hidden]`, in f32 (f64 for an f64 model).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_on(hidden, Kernels::Inference)
    }

    /// [`Self::logits`] on the given kernels (training needs no gradient for the head).
    pub fn logits_on(&self, hidden: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let logits = ops::linear(&self.lm_head, hidden, kernels)?;
        Ok(logits.to_dtype(ops::accumulation_dtype(self.dtype))?)
    }

    /// Applies RoPE to `x` (`[batch, heads, seq, head_dim]`) at integer
    /// `positions` (`[batch, seq]`, negative ones rotate backwards), as the
    /// forward pass does to keys.
    pub fn rotate(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let tables = self.rope.tables(positions, x.dtype())?;
        Rope::apply(x, &tables, Kernels::Inference)
    }

    /// Runs the blocks over `input`; see [`ForwardInput`].
    pub fn forward(&self, input: ForwardInput) -> Result<ForwardOutput> {
        self.run(&self.blocks, input, None)
    }

    /// Runs the first `layers` blocks and the final norm: the model
    /// truncated to `layers` layers (GMSA's encoder). `input`'s K/V and LoRA
    /// cover those layers only.
    pub fn forward_first(&self, layers: usize, input: ForwardInput) -> Result<ForwardOutput> {
        if layers > self.blocks.len() {
            return Err(InputError::Layers {
                what: "a truncated pass",
                got: layers,
                model: self.blocks.len(),
            }
            .into());
        }
        self.run(&self.blocks[..layers], input, None)
    }

    /// Runs `layers`, blocks of other weights, then this model's final norm,
    /// with its rotary embedding (GMSA's alignment block).
    pub fn forward_with(&self, layers: &Layers, input: ForwardInput) -> Result<ForwardOutput> {
        self.run(&layers.blocks, input, None)
    }

    /// [`Decoder::forward`], also reporting in [`ForwardOutput::attention`]
    /// the attention every layer pays to the past keys `probe` names.
    pub fn forward_probed(
        &self,
        input: ForwardInput,
        probe: &AttentionProbe,
    ) -> Result<ForwardOutput> {
        self.run(&self.blocks, input, Some(probe))
    }

    fn run(
        &self,
        blocks: &[Block],
        input: ForwardInput,
        probe: Option<&AttentionProbe>,
    ) -> Result<ForwardOutput> {
        let (batch, seq, hidden_size) = input.embeds.dims3()?;
        if hidden_size != self.config.hidden_size {
            return Err(InputError::EmbeddingWidth {
                got: hidden_size,
                model: self.config.hidden_size,
            }
            .into());
        }
        if input.positions.dims() != [batch, seq] {
            return Err(InputError::PositionShape {
                got: input.positions.dims().to_vec(),
                batch,
                seq,
            }
            .into());
        }
        for (what, layers) in [
            ("shared K/V", input.shared.map(<[SharedKv]>::len)),
            ("past K/V", input.past.map(<[LayerKv]>::len)),
            ("LoRA", input.lora.map(|l| l.layers.len())),
        ] {
            if let Some(layers) = layers.filter(|&n| n != blocks.len()) {
                return Err(InputError::Layers {
                    what,
                    got: layers,
                    model: blocks.len(),
                }
                .into());
            }
        }
        let past_len = input.past.and_then(|p| p.first()).map_or(0, LayerKv::len);
        if let Some(probe) = probe {
            probe.check(past_len)?;
        }
        let mask = self.additive_mask(input.mask, batch, seq, past_len)?;
        let tables = self
            .rope
            .tables(&input.positions.to_dtype(DType::U32)?, self.dtype)?;
        let no_lora = LayerLora::default();

        let mut x = input.embeds.to_dtype(self.dtype)?;
        let mut kv = Vec::with_capacity(blocks.len());
        let mut attention = Vec::new();
        for (i, block) in blocks.iter().enumerate() {
            let lora = input.lora.map_or(&no_lora, |l| &l.layers[i]);
            let step = BlockStep {
                tables: &tables,
                mask: mask.as_ref(),
                shared: input.shared.map(|s| &s[i]),
                past: input.past.map(|p| &p[i]),
                lora,
                probe,
                kernels: input.kernels,
                bf16: self.bf16_weights(),
            };
            let (y, layer_kv, measured) = block.forward(&x, &self.config, &step)?;
            x = y;
            kv.push(layer_kv);
            attention.extend(measured);
        }
        let hidden = ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps, input.kernels)?;
        Ok(ForwardOutput {
            hidden,
            kv,
            attention,
        })
    }

    /// The mask as a `[batch|1, 1, 1, seq, past+seq]` tensor in the
    /// accumulation dtype, or `None` when every position is visible.
    fn additive_mask(
        &self,
        mask: AttentionMask,
        batch: usize,
        seq: usize,
        past: usize,
    ) -> Result<Option<Tensor>> {
        let tensor = match mask {
            AttentionMask::Full => return Ok(None),
            AttentionMask::Causal if seq == 1 => return Ok(None),
            AttentionMask::Causal => mask::causal(seq, past, &self.device)?,
            AttentionMask::Additive(t) => t.clone(),
        };
        let keys = past + seq;
        let rows = match tensor.dims() {
            [s, k] if *s == seq && *k == keys => 1,
            [b, s, k] if (*b == batch || *b == 1) && *s == seq && *k == keys => *b,
            other => {
                return Err(InputError::MaskShape {
                    got: other.to_vec(),
                    batch,
                    seq,
                    keys,
                }
                .into());
            }
        };
        let acc = ops::accumulation_dtype(self.dtype);
        Ok(Some(
            tensor
                .to_device(&self.device)?
                .to_dtype(acc)?
                .reshape((rows, 1, 1, seq, keys))?,
        ))
    }
}

/// What every block of one forward pass shares, plus its own past and LoRA.
pub(super) struct BlockStep<'a> {
    tables: &'a RopeTables,
    pub(super) mask: Option<&'a Tensor>,
    shared: Option<&'a SharedKv>,
    pub(super) past: Option<&'a LayerKv>,
    lora: &'a LayerLora,
    pub(super) probe: Option<&'a AttentionProbe>,
    pub(super) kernels: Kernels,
    /// The model runs bf16 products ([`Decoder::pack_bf16`]): the
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
type BlockOutput = (Tensor, LayerKv, Option<Tensor>);

impl Block {
    /// The block's weights and biases, named as below a model's
    /// `layers.{i}` (`input_layernorm.weight`, `self_attn.q_proj.weight`, ...).
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
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
    fn tensor_count(&self) -> usize {
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

    fn projections_mut(&mut self) -> [&mut Projection; 7] {
        let (a, m) = (&mut self.attention, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    fn forward(&self, x: &Tensor, c: &ModelConfig, step: &BlockStep) -> Result<BlockOutput> {
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
