//! The training objective of one sample: the compressor (the base model with
//! the adapter) turns the context into anchor K/V, and the frozen decoder,
//! reading them as its past, predicts the target after `[LM]` and the prompt,
//! laid out exactly as `sac ask` lays out a question; GMSA's objective is in
//! [`super::gmsa`]. [`backward`] sums either over a batch.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::adapter::{Loaded, SacAdapter};
use crate::compress::sac::Sac;
use crate::compress::{Compressor, Pass};
use crate::error::{InputError, Result};
use crate::layout::{self, chunk::Chunk};
use crate::model::{AttentionMask, Decoder, ForwardInput, Kernels, LayerKv};

use super::data::Sample;
use super::params::Trainables;

/// One backward pass: the losses of `samples` summed and multiplied by
/// `scale`; returns that value and each variable's gradient (in the order of
/// [`Trainables::named`], zero for a variable the loss does not reach).
///
/// A SAC sample is backpropagated chunk by chunk ([`sac_sample_backward`]),
/// so memory holds one chunk's graph however long the context is; a GMSA
/// sample's graph is built whole.
pub fn backward(
    decoder: &Decoder,
    params: &Trainables,
    samples: &[Sample],
    scale: f64,
) -> Result<(f64, Vec<Tensor>)> {
    if samples.is_empty() {
        return Err(InputError::NoSample.into());
    }
    let mut grads = Gradients::new(params);
    let mut total = 0.0;
    match params.adapter(decoder.config(), decoder.dtype())? {
        Loaded::Sac(adapter) => {
            // The same values with no graph, for each sample's first pass.
            let Loaded::Sac(values) = params.snapshot(decoder.config(), decoder.dtype())? else {
                unreachable!("one adapter config builds one kind of adapter")
            };
            for sample in samples {
                total +=
                    sac_sample_backward(decoder, (&adapter, &values), sample, scale, &mut grads)?;
            }
        }
        Loaded::Gmsa(adapter) => {
            for sample in samples {
                let loss = super::gmsa::sample_loss(decoder, &adapter, sample, Kernels::Training)?;
                let objective = (loss * scale)?;
                total += scalar(&objective)?;
                grads.add(&objective)?;
            }
        }
    }
    Ok((total, grads.finish()?))
}

/// A scalar tensor's value (a device sync on a GPU).
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The trainables' gradients summed over several backward passes.
struct Gradients<'a> {
    params: &'a Trainables,
    sums: Vec<Option<Tensor>>,
}

impl<'a> Gradients<'a> {
    fn new(params: &'a Trainables) -> Self {
        Gradients {
            params,
            sums: params.named().map(|_| None).collect(),
        }
    }

    /// Backpropagates `objective` (a scalar), adds what reaches the
    /// trainables, and returns the store, which also holds the gradients of
    /// any other variable in the graph.
    fn add(&mut self, objective: &Tensor) -> Result<GradStore> {
        let store = objective.backward()?;
        for ((_, var), sum) in self.params.named().zip(&mut self.sums) {
            // Detached: a variable's gradient is built from the forward
            // pass's activations, and would otherwise keep that pass's whole
            // graph alive for as long as the sum lives.
            if let Some(g) = store.get(var.as_tensor()).map(Tensor::detach) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(store)
    }

    fn finish(self) -> Result<Vec<Tensor>> {
        self.params
            .named()
            .zip(self.sums)
            .map(|((_, var), sum)| match sum {
                Some(g) => Ok(g),
                None => Ok(var.as_tensor().zeros_like()?),
            })
            .collect()
    }
}

/// Backpropagates `scale` times one SAC sample's loss into `grads` without
/// holding the whole graph: the anchors' K/V of every chunk are computed
/// first with no graph (from `values`, the adapter's tensors detached) and
/// become leaves of the decoder's loss, whose
/// backward pass gives their gradients (and `[LM]`'s); then each chunk is
/// encoded again on the differentiable path and its anchors' K/V, dotted
/// with those gradients, are backpropagated into the adapter. Chunks do not
/// see each other, so this is the whole sample's gradient, for one more
/// forward pass without a graph (`tests/train.rs` checks it against finite
/// differences). A context of one chunk is backpropagated whole. Returns the
/// scaled loss.
fn sac_sample_backward(
    decoder: &Decoder,
    (adapter, values): (&SacAdapter, &SacAdapter),
    sample: &Sample,
    scale: f64,
    grads: &mut Gradients,
) -> Result<f64> {
    if sample.context.len() <= adapter.config.chunk_size {
        // One chunk: its graph is the whole sample's anyway.
        let loss = (sample_loss(decoder, adapter, sample, Kernels::Training)? * scale)?;
        grads.add(&loss)?;
        return scalar(&loss);
    }
    // The anchors' K/V of every chunk, as variables: the loss's leaves.
    let as_leaf = |t: &Tensor| -> Result<Tensor> { Ok(Var::from_tensor(t)?.into_inner()) };
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut anchors: Vec<Vec<LayerKv>> = Vec::new();
    Compressor::new(decoder, Box::new(Sac::new(values))).compress(&sample.context, |out| {
        let out = out.into_kv()?;
        let leaves = out
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: as_leaf(&l.k)?,
                    v: as_leaf(&l.v)?,
                })
            })
            .collect::<Result<_>>()?;
        chunks.push(out.chunk);
        anchors.push(leaves);
        Ok(())
    })?;
    let past = LayerKv::concat_chunks(&anchors)?;
    let loss = (loss_after(decoder, adapter, sample, &past, Kernels::Training)? * scale)?;
    let store = grads.add(&loss)?;
    // Nothing below needs the decoder's graph, which the loss holds.
    let value = scalar(&loss)?;
    drop((loss, past));
    let sac = Sac::new(adapter);
    let pass = Pass {
        kernels: Kernels::Training,
        ..Pass::new(decoder)
    };
    for (chunk, chunk_leaves) in chunks.iter().zip(&anchors) {
        let ids = &sample.context[chunk.start..chunk.start + chunk.len];
        let (_, kv) = sac.encode(&pass, chunk, ids)?;
        let mut terms = Vec::new();
        for (layer, leaves) in kv.iter().zip(chunk_leaves) {
            for (x, leaf) in [(&layer.k, &leaves.k), (&layer.v, &leaves.v)] {
                if let Some(g) = store.get(leaf) {
                    terms.push((x * g.detach())?.sum_all()?);
                }
            }
        }
        if !terms.is_empty() {
            grads.add(&Tensor::stack(&terms, 0)?.sum_all()?)?;
        }
    }
    Ok(value)
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
    let past = Compressor::new(decoder, Box::new(Sac::new(adapter)))
        .with_kernels(kernels)
        .anchor_past(&sample.context)?;
    loss_after(decoder, adapter, sample, &past, kernels)
}

/// [`sample_loss`] with the anchors' K/V given: the decoder reads them as
/// its past, then `[LM]`, the prompt and the target.
fn loss_after(
    decoder: &Decoder,
    adapter: &SacAdapter,
    sample: &Sample,
    past: &[LayerKv],
    kernels: Kernels,
) -> Result<Tensor> {
    let read = read_ids(sample)?;
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
        past: Some(past),
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
