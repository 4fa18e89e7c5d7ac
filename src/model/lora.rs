//! Low-rank extra weights on a layer's linear projections (LoRA), passed to
//! a forward pass rather than merged into the base weights, so one copy of
//! the base model serves as both a compressor (SAC's bidirectional pass,
//! GMSA's encoder, with LoRA) and the frozen decoder (without).

use candle_core::Tensor;

use super::config::ModelConfig;
use super::ops::matmul_last;
use crate::error::Result;

/// `scale * (x @ a @ b)` with `a` of shape `[in, rank]` and `b` `[rank, out]`.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl LowRank {
    /// The term added to the base projection of `x` (`[..., in]`).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        Ok((matmul_last(&matmul_last(x, &a)?, &b)? * self.scale)?)
    }
}

/// A projection LoRA can adapt. SAC adapts attention only (the paper q and
/// v; k lets an anchor change the key it is found by directly, o what it
/// writes back); GMSA's encoder adapts every linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// The attention projections.
    pub const ATTENTION: [LoraTarget; 4] =
        [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O];

    /// Every linear layer of a block (PEFT's `all-linear`).
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's name, as in `adapter_config.json` and PEFT.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// Whether the projection is attention's (`self_attn`) or the MLP's.
    pub fn is_attention(self) -> bool {
        LoraTarget::ATTENTION.contains(&self)
    }

    pub fn from_name(name: &str) -> Option<LoraTarget> {
        LoraTarget::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The targets `names` name, in [`LoraTarget::ALL`]'s order, each once;
    /// other names are skipped (check them with [`LoraTarget::from_name`]).
    pub fn from_names(names: &[String]) -> Vec<LoraTarget> {
        LoraTarget::ALL
            .into_iter()
            .filter(|t| names.iter().any(|n| n == t.name()))
            .collect()
    }

    /// The names of `targets`, as `adapter_config.json` lists them.
    pub fn names(targets: &[LoraTarget]) -> Vec<String> {
        targets.iter().map(|t| t.name().to_string()).collect()
    }

    /// The stem of this projection's `lora_a`/`lora_b` tensors in `layer`
    /// (`layers.3.self_attn.q_proj`, `layers.3.mlp.up_proj`), as
    /// `adapter.safetensors` names them.
    pub fn tensor_stem(self, layer: usize) -> String {
        let block = if self.is_attention() {
            "self_attn"
        } else {
            "mlp"
        };
        format!("layers.{layer}.{block}.{}", self.name())
    }

    /// `(in, out)` features of the projection in `model`.
    pub fn features(self, model: &ModelConfig) -> (usize, usize) {
        let q = model.num_heads * model.head_dim;
        let kv = model.num_kv_heads * model.head_dim;
        match self {
            LoraTarget::Q => (model.hidden_size, q),
            LoraTarget::K | LoraTarget::V => (model.hidden_size, kv),
            LoraTarget::O => (q, model.hidden_size),
            LoraTarget::Gate | LoraTarget::Up => (model.hidden_size, model.intermediate_size),
            LoraTarget::Down => (model.intermediate_size, model.hidden_size),
        }
    }
}

/// The extra weights of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    pub q: Option<LowRank>,
    pub k: Option<LowRank>,
    pub v: Option<LowRank>,
    pub o: Option<LowRank>,
    pub gate: Option<LowRank>,
    pub up: Option<LowRank>,
    pub down: Option<LowRank>,
}

impl LayerLora {
    /// One layer's LoRA, each projection's made by `make` (`None`: not adapted).
    pub fn try_from_fn<E>(
        mut make: impl FnMut(LoraTarget) -> std::result::Result<Option<LowRank>, E>,
    ) -> std::result::Result<Self, E> {
        Ok(LayerLora {
            q: make(LoraTarget::Q)?,
            k: make(LoraTarget::K)?,
            v: make(LoraTarget::V)?,
            o: make(LoraTarget::O)?,
            gate: make(LoraTarget::Gate)?,
            up: make(LoraTarget::Up)?,
            down: make(LoraTarget::Down)?,
        })
    }

    pub fn get(&self, target: LoraTarget) -> Option<&LowRank> {
        match target {
            LoraTarget::Q => self.q.as_ref(),
            LoraTarget::K => self.k.as_ref(),
            LoraTarget::V => self.v.as_ref(),
            LoraTarget::O => self.o.as_ref(),
            LoraTarget::Gate => self.gate.as_ref(),
            LoraTarget::Up => self.up.as_ref(),
            LoraTarget::Down => self.down.as_ref(),
        }
    }
}

/// LoRA for every layer a pass runs, indexed by layer.
#[derive(Debug, Clone, Default)]
pub struct ModelLora {
    pub layers: Vec<LayerLora>,
}
