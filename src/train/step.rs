//! The training objective of one sample: the compressor (the base model with
//! the adapter) turns the context into anchor K/V, and the frozen decoder,
//! reading them as its past, predicts the target after `[LM]` and the prompt,
//! laid out exactly as `sac ask` lays out a question; GMSA's objective is in
//! [`super::gmsa`]. One backward pass over a batch serves both.

use candle_core::{DType, Tensor};

use crate::adapter::{Loaded, SacAdapter};
use crate::compress::Compressor;
use crate::compress::sac::Sac;
use crate::error::{InputError, Result};
use crate::layout;
use crate::model::{AttentionMask, Decoder, ForwardInput, Kernels};

use super::data::Sample;
use super::params::Trainables;

/// One backward pass: the losses of `samples` summed and multiplied by
/// `scale`; returns that value and each variable's gradient (in the order of
/// [`Trainables::named`], zero for a variable the loss does not reach).
pub fn backward(
    decoder: &Decoder,
    params: &Trainables,
    samples: &[Sample],
    scale: f64,
) -> Result<(f64, Vec<Tensor>)> {
    let adapter = params.adapter(decoder.config(), decoder.dtype())?;
    let mut total: Option<Tensor> = None;
    for sample in samples {
        let loss = match &adapter {
            Loaded::Sac(adapter) => sample_loss(decoder, adapter, sample, Kernels::Training)?,
            Loaded::Gmsa(adapter) => {
                super::gmsa::sample_loss(decoder, adapter, sample, Kernels::Training)?
            }
        };
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss,
        });
    }
    let Some(total) = total else {
        return Err(InputError::NoSample.into());
    };
    let scaled = (total * scale)?;
    let store = scaled.backward()?;
    let grads = params
        .named()
        .map(|(_, var)| match store.get(var.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(var.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
}

/// Mean next-token cross-entropy over `sample.target` (a scalar tensor in
/// f32, or f64 for an f64 model). On `Kernels::Training` the graph reaches back
/// through the decoder, the anchors' K/V and the compressor to the adapter's
/// tensors.
pub fn sample_loss(
    decoder: &Decoder,
    adapter: &SacAdapter,
    sample: &Sample,
    kernels: Kernels,
) -> Result<Tensor> {
    let read = read_ids(sample)?;
    let past = Compressor::new(decoder, Box::new(Sac::new(adapter)))
        .with_kernels(kernels)
        .anchor_past(&sample.context)?;
    let device = decoder.device();
    let hidden_size = decoder.config().hidden_size;
    let lm = adapter.lm_embedding()?.reshape((1, 1, hidden_size))?;
    let embeds = embeds_after(decoder, lm, &read)?;
    // [LM] just before the question, which follows the context.
    let first = layout::prefix_position(layout::question_position(sample.context.len())?, 1);
    let positions = Tensor::arange(first, first + 1 + read.len() as u32, device)?.unsqueeze(0)?;
    let out = decoder.forward(ForwardInput {
        embeds: &embeds,
        positions: &positions,
        mask: AttentionMask::Causal,
        shared: None,
        past: Some(&past),
        lora: None,
        kernels,
    })?;
    target_loss(decoder, &out.hidden, &sample.target, kernels)
}

/// What the decoder reads after its prefix for `sample`: the prompt, then
/// every target but the last, since each position predicts the next token.
pub(super) fn read_ids(sample: &Sample) -> Result<Vec<u32>> {
    let Some((_, read_targets)) = sample.target.split_last() else {
        return Err(InputError::NoTarget.into());
    };
    Ok(sample.prompt.iter().chain(read_targets).copied().collect())
}

/// `prefix` (`[1, n, hidden]`) followed by the token embeddings of `ids`.
pub(super) fn embeds_after(decoder: &Decoder, prefix: Tensor, ids: &[u32]) -> Result<Tensor> {
    if ids.is_empty() {
        return Ok(prefix);
    }
    let ids = Tensor::new(ids, decoder.device())?.unsqueeze(0)?;
    Ok(Tensor::cat(&[&prefix, &decoder.embed(&ids)?], 1)?)
}

/// Mean cross-entropy of `target` as predicted by the last `target.len()`
/// positions of `hidden` (`[1, len, hidden]`, read as [`read_ids`] lays it
/// out: the position before the first target predicts it).
pub(super) fn target_loss(
    decoder: &Decoder,
    hidden: &Tensor,
    target: &[u32],
    kernels: Kernels,
) -> Result<Tensor> {
    let first = hidden.dim(1)? - target.len();
    let scored = hidden.narrow(1, first, target.len())?;
    let logits = decoder.logits_on(&scored, kernels)?.squeeze(0)?;
    let targets = Tensor::new(target, decoder.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}
