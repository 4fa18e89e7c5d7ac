//! One forward pass over context tokens, the way every compressor runs them:
//! the tokens at consecutive position ids, with whatever the method adds.

use candle_core::Tensor;

use super::Pass;
use crate::error::Result;
use crate::layout;
use crate::model::{
    AttentionMask, AttentionProbe, ForwardInput, ForwardOutput, LayerKv, ModelLora,
};

/// A pass over `ids` at position ids `first_position..` (1-based).
pub(super) struct Input<'x> {
    pub ids: &'x [u32],
    pub first_position: usize,
    /// Added to the token embeddings (SAC's role embeddings).
    pub extra: Option<Tensor>,
    pub mask: AttentionMask<'x>,
    pub past: Option<&'x [LayerKv]>,
    pub lora: Option<&'x ModelLora>,
    /// Measures the attention paid to the past (the selectors' scores).
    pub probe: Option<&'x AttentionProbe>,
}

impl<'x> Input<'x> {
    /// A causal pass over `ids` at `first_position..`, after `past`.
    pub fn causal(ids: &'x [u32], first_position: usize, past: Option<&'x [LayerKv]>) -> Self {
        Input {
            ids,
            first_position,
            extra: None,
            mask: AttentionMask::Causal,
            past,
            lora: None,
            probe: None,
        }
    }
}

pub(super) fn forward(pass: &Pass, input: Input) -> Result<ForwardOutput> {
    let decoder = pass.decoder;
    let device = decoder.device();
    let first = input.first_position;
    let first = layout::position_id(first as u64)?;
    let ids = Tensor::new(input.ids, device)?.unsqueeze(0)?;
    let positions = Tensor::arange(first, first + input.ids.len() as u32, device)?.unsqueeze(0)?;
    let mut embeds = decoder.embed(&ids)?;
    if let Some(extra) = input.extra {
        embeds = (embeds + extra)?;
    }
    let forward = ForwardInput {
        embeds: &embeds,
        positions: &positions,
        mask: input.mask,
        shared: None,
        past: input.past,
        lora: input.lora,
        kernels: pass.kernels,
    };
    match input.probe {
        Some(probe) => decoder.forward_probed(forward, probe),
        None => decoder.forward(forward),
    }
}
