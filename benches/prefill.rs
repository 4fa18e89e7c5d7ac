//! Prefill throughput of our decoder on a random-weight model of
//! Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP
//! 8192, vocab 128256, tied embeddings), the figure to set beside
//! `scripts/bench_hf_prefill.py` on the same machine and threads.
//!
//! `cargo bench --bench prefill -- [--tokens 512] [--repeats 3] [--dtype f32]`

mod common;

use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use common::{LLAMA_3_2_1B, Placement};
use sac::model::{ForwardInput, ModelConfig};

#[derive(Parser)]
struct Args {
    /// Prompt length.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Timed runs after one warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[command(flatten)]
    placement: Placement,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = ModelConfig::from_json(LLAMA_3_2_1B).map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let (decoder, dtype) = args.placement.random_decoder(&config)?;
    let device = decoder.device().clone();
    let init_s = t0.elapsed().as_secs_f64();

    let n = args.tokens;
    let ids: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7919) % config.vocab_size as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (1, n), &device)?;
    let positions = Tensor::arange(0u32, n as u32, &device)?.unsqueeze(0)?;
    let prefill = || -> anyhow::Result<f64> {
        let start = Instant::now();
        let embeds = decoder.embed(&ids)?;
        let out = decoder.forward(ForwardInput::causal(&embeds, &positions))?;
        // Only the last position's logits, as generation needs.
        let logits = decoder.logits(&out.hidden.narrow(1, n - 1, 1)?)?;
        logits.to_device(&Device::Cpu)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let warmup_s = prefill()?;
    let mut times: Vec<f64> = (0..args.repeats)
        .map(|_| prefill())
        .collect::<anyhow::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "sac",
            "threads": candle_core::utils::get_num_threads(),
            "tokens": n,
            "dtype": dtype,
            "device": args.placement.device.to_string(),
            "init_s": init_s,
            "warmup_s": warmup_s,
            "best_s": times[0],
            "median_s": median,
            "tokens_per_s": n as f64 / median,
        })
    );
    Ok(())
}
