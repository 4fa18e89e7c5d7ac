//! GMSA's training objective, as the official code computes it: the
//! decoder reads the soft tokens of `sample.context` from position 0, then
//! `sample.prompt`, and is scored on predicting `sample.target`. Stage 1
//! (autoencoding) asks it to restate the context ([`RESTATE`], the context
//! and EOS as target) with the decoder frozen, so that the encoder's LoRA and
//! the alignment block learn to pack the context; stage 2 scores answers to
//! questions with the compressor frozen, the decoder reading everything
//! through its own LoRA. `sac train --method gmsa --stage autoencode` runs
//! stage 1, `--stage qa --init STAGE1_ADAPTER` stage 2; the objective is checked against HF transformers and finite differences
//! (`tests/gmsa.rs`).

use candle_core::Tensor;

use super::data::Sample;
use super::step::{embeds_after, read_ids, target_loss};
use crate::adapter::GmsaAdapter;
use crate::compress::gmsa::soft_tokens;
use crate::error::Result;
use crate::model::{Decoder, ForwardInput, Kernels};

/// Stage 1's prompt, after the soft tokens.
pub const RESTATE: &str = "Restate the aforementioned Text.";

/// Mean next-token cross-entropy over `sample.target` (a scalar in f32, or
/// f64 for an f64 model). On `Kernels::Training` the graph reaches back
/// through the decoder and the soft tokens to the adapter's tensors.
pub fn sample_loss(
    decoder: &Decoder,
    adapter: &GmsaAdapter,
    sample: &Sample,
    kernels: Kernels,
) -> Result<Tensor> {
    let read = read_ids(sample)?;
    let soft = soft_tokens(decoder, adapter, &sample.context, kernels)?.unsqueeze(0)?;
    let embeds = embeds_after(decoder, soft, &read)?;
    let len = embeds.dim(1)? as u32;
    let positions = Tensor::arange(0u32, len, decoder.device())?.unsqueeze(0)?;
    let out = decoder.forward(ForwardInput {
        lora: adapter.decoder_lora.as_ref(),
        kernels,
        ..ForwardInput::causal(&embeds, &positions)
    })?;
    target_loss(decoder, &out.hidden, &sample.target, kernels)
}
