//! The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3.
//!
//! candle-transformers' models keep their KV cache private, accept no general
//! mask and return only the last position; SAC needs all three (anchors read
//! out of a bidirectional pass, a decoder whose past is a loaded .sack), so
//! this file is our own forward pass, written after candle's `llama.rs` and
//! transformers' `modeling_llama.py`. The four families differ only in the
//! switches of [`ModelConfig`] (biases, q/k norms, RoPE scaling), hence one file.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use rayon::prelude::*;

use super::block::{Block, BlockStep, linear, load_block};
use super::config::ModelConfig;
use super::kv::{LayerKv, SharedKv};
use super::lora::{LayerLora, ModelLora};
use super::mask::{self, AttentionMask};
use super::ops::{self, Kernels};
use super::probe::AttentionProbe;
use super::projection::Projection;
use super::rope::Rope;
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
            .map(|i| load_block(config, &vb.pp(i.to_string()), false))
            .collect::<Result<Vec<_>>>()?;
        Ok(Layers { blocks })
    }

    /// The weight and bias tensors the blocks hold.
    pub fn tensor_count(&self) -> usize {
        self.blocks.iter().map(Block::tensor_count).sum()
    }
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

impl Decoder {
    /// Builds the model from weights named as in transformers checkpoints
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...).
    ///
    /// `bf16_weights`: every projection's weight, the head's included, is
    /// packed in bf16 for the CPU kernel ([`super::cpu::bf16`]) as it is
    /// read, its f32 copy dropped at once; the activations, norms,
    /// embeddings and K/V stay in the model's dtype (f32). On the CPU the
    /// blocks load in parallel: from a source that reads each tensor when
    /// asked (the GGUF loader dequantizes it then), no more than a block per
    /// thread is ever held in f32 beside the packed weights.
    pub fn load(config: ModelConfig, vb: VarBuilder, bf16_weights: bool) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let model = vb.pp("model");
        let embed_weight = model.get((c.vocab_size, h), "embed_tokens.weight")?;
        let layers = model.pp("layers");
        let block = |i: usize| load_block(c, &layers.pp(i.to_string()), bf16_weights);
        // A GPU's tensors are made on the thread that holds its context.
        let blocks = if vb.device().is_cpu() {
            (0..c.num_layers).into_par_iter().map(block).collect()
        } else {
            (0..c.num_layers).map(block).collect::<Result<Vec<_>>>()
        }?;
        let embed_tokens = Embedding::new(embed_weight.clone(), h);
        let lm_head = if c.tie_word_embeddings {
            Projection::new(embed_weight, None, bf16_weights)?
        } else {
            linear(&vb, (h, c.vocab_size), false, "lm_head", bf16_weights)?
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

    /// Whether the projections' weights are packed bf16 ([`Self::load`]'s
    /// `bf16_weights`).
    pub fn bf16_weights(&self) -> bool {
        self.lm_head.bf16().is_some()
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
