//! GMSA's training objective, as the official code computes it: the
//! decoder reads the soft tokens of `sample.context` from position 0, then
//! `sample.prompt`, and is scored on predicting `sample.target`. Stage 1
//! (autoencoding) asks it to restate the context ([`RESTATE`], the context
//! and EOS as target) with the decoder frozen, so that the encoder's LoRA and
//! the alignment block learn to pack the context; stage 2 scores answers to
//! questions. `sac train` runs SAC's objective only so far; this one is
//! checked against HF transformers and finite differences
//! (`tests/gmsa.rs`).

use candle_core::Tensor;

use super::data::Sample;
use crate::adapter::GmsaAdapter;
use crate::compress::gmsa::soft_tokens;
use crate::error::{InputError, Result};
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
    let Some((_, read_targets)) = sample.target.split_last() else {
        return Err(InputError::NoTarget.into());
    };
    let soft = soft_tokens(decoder, adapter, &sample.context, kernels)?.unsqueeze(0)?;
    let device = decoder.device();
    let read: Vec<u32> = sample.prompt.iter().chain(read_targets).copied().collect();
    let embeds = match read.is_empty() {
        true => soft,
        false => {
            let ids = Tensor::new(read.as_slice(), device)?.unsqueeze(0)?;
            Tensor::cat(&[soft, decoder.embed(&ids)?], 1)?
        }
    };
    let len = embeds.dim(1)?;
    let positions = Tensor::arange(0u32, len as u32, device)?.unsqueeze(0)?;
    let out = decoder.forward(ForwardInput {
        kernels,
        ..ForwardInput::causal(&embeds, &positions)
    })?;
    // The last soft token or prompt token predicts the first target.
    let first = len - read_targets.len() - 1;
    let scored = out.hidden.narrow(1, first, sample.target.len())?;
    let logits = decoder.logits_on(&scored, kernels)?.squeeze(0)?;
    let targets = Tensor::new(sample.target.as_slice(), device)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}
