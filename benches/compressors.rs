//! Compress time of each training-free compressor beside a plain prefill of
//! the same document, on a random-weight model of Llama-3.2-1B's shape
//! (hidden 2048, 32 heads, 8 KV heads, MLP 8192). Every cost here grows with
//! the layer count alike, so `--layers` trims the model without moving the
//! ratios much. The kept K/V are computed and dropped, not written.
//!
//! `cargo bench --bench compressors -- [--tokens 2048] [--layers 4]
//! [--chunk-size 510] [--ratio 5] [--device cpu]`
//!
//! One JSON line per compressor: its seconds, its ratio to the plain
//! prefill (one causal pass over the whole document), and its ratio to its
//! own chunked prefill. `sac` is left out: it needs a trained adapter, and
//! costs what `uniform` does plus LoRA.

mod common;

use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use common::{LLAMA_3_2_1B, Placement};
use sac::compress::{
    Compressor, RepeatPrompt, Request, Settings, full, kvzip, snapkv, streaming, uniform,
};
use sac::model::{Decoder, ForwardInput, ModelConfig};

#[derive(Parser)]
struct Args {
    /// Document length.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Layers of the model (Llama-3.2-1B has 16).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 510)]
    chunk_size: usize,
    #[arg(long, default_value_t = 5)]
    ratio: usize,
    #[command(flatten)]
    placement: Placement,
}

/// Token ids of about the lengths Llama 3's tokenizer gives KVzip's prompts.
fn repeat_prompt(vocab: u32) -> RepeatPrompt {
    let ids = |n: u32, salt: u32| (0..n).map(|i| (i * 7919 + salt) % vocab).collect();
    RepeatPrompt {
        first: ids(15, 1),
        next: ids(17, 2),
        answer: ids(5, 3),
    }
}

fn plain_prefill(decoder: &Decoder, ids: &Tensor) -> anyhow::Result<f64> {
    let n = ids.dim(1)?;
    let started = Instant::now();
    let positions = Tensor::arange(1u32, n as u32 + 1, decoder.device())?.unsqueeze(0)?;
    let embeds = decoder.embed(ids)?;
    let out = decoder.forward(ForwardInput::causal(&embeds, &positions))?;
    out.hidden.narrow(1, n - 1, 1)?.to_device(&Device::Cpu)?;
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = ModelConfig::from_json(LLAMA_3_2_1B).map_err(anyhow::Error::msg)?;
    config.num_layers = args.layers;
    let (decoder, dtype) = args.placement.random_decoder(&config)?;
    let device = decoder.device().clone();
    let vocab = config.vocab_size as u32;
    let ids: Vec<u32> = (0..args.tokens as u32)
        .map(|i| (i * 104_729 + 17) % vocab)
        .collect();
    let ids_t = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
    plain_prefill(&decoder, &ids_t)?;
    let prefill_s = plain_prefill(&decoder, &ids_t)?;
    println!(
        "{}",
        serde_json::json!({
            "compressor": "plain prefill",
            "tokens": args.tokens,
            "layers": args.layers,
            "dtype": dtype,
            "device": args.placement.device.to_string(),
            "threads": candle_core::utils::get_num_threads(),
            "seconds": prefill_s,
        })
    );
    for method in [
        &full::METHOD,
        &uniform::METHOD,
        &streaming::METHOD,
        &snapkv::METHOD,
        &kvzip::METHOD,
    ] {
        let ratio = if method == &full::METHOD {
            1
        } else {
            args.ratio
        };
        let request = Request {
            ratio: Some(ratio),
            chunk_size: Some(args.chunk_size),
            ..Request::new(method)
        };
        let strategy = Settings::resolve(&request, None)?.build(
            None,
            || Ok(repeat_prompt(vocab)),
            ids.len(),
        )?;
        let compressor = Compressor::new(&decoder, strategy);
        let started = Instant::now();
        let cost = compressor.compress(&ids, |out| {
            out.into_kv()?
                .layers
                .last()
                .map(|l| l.k.to_device(&Device::Cpu))
                .transpose()?;
            Ok(())
        })?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "compressor": method.name,
                "ratio": ratio,
                "chunk_size": args.chunk_size,
                "seconds": seconds,
                "x_plain_prefill": seconds / prefill_s,
                "x_own_prefill": cost.prefill.map(|p| seconds / p.as_secs_f64()),
            })
        );
    }
    Ok(())
}
