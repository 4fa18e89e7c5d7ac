//! Peak memory and time of one `sac train` step on a random-weight model of
//! Llama-3.2-1B's shape: one chunk of context through the compressor (LoRA
//! on q/v at the given rank, role embeddings), the frozen decoder reading
//! `[LM]` and a continuation after the anchors, backward, clipping, AdamW.
//! Prints one JSON line with the peak resident set size (VmHWM of
//! /proc/self/status, which includes the model's weights).
//!
//! `cargo bench --bench train_step -- [--tokens 510] [--continuation 256] [--rank 128] [--ratio 5]`
//! (`scripts/bench_train_step.sh` runs the default case.)

mod common;

use std::time::Instant;

use clap::Parser;
use sac::adapter::AdapterConfig;
use sac::device::{DTypeSpec, DeviceSpec, Workload};
use sac::layout::chunk;
use sac::model::{Decoder, ModelConfig};
use sac::train::data::Sample;
use sac::train::optimizer::{AdamW, clip_global_norm};
use sac::train::params::Trainables;
use sac::train::step;

#[derive(Parser)]
struct Args {
    /// Context tokens: one chunk of this length.
    #[arg(long, default_value_t = 510)]
    tokens: usize,
    /// Tokens the decoder predicts after `[LM]` (sac train's default for pretraining).
    #[arg(long, default_value_t = 256)]
    continuation: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 128)]
    rank: usize,
    #[arg(long, default_value_t = 5)]
    ratio: usize,
    /// Fewer layers than the model's 16, to extrapolate on a small machine.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, default_value = "auto")]
    dtype: DTypeSpec,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A field of /proc/self/status in GiB (`VmHWM`: peak RSS; `VmRSS`: now).
fn status_gib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = args.device.open()?;
    let dtype = args.dtype.resolve(&device, Workload::Training).dtype;
    let mut config = ModelConfig::from_json(common::LLAMA_3_2_1B).map_err(anyhow::Error::msg)?;
    if let Some(layers) = args.layers {
        config.num_layers = layers;
    }
    let t0 = Instant::now();
    let decoder = Decoder::load(
        config.clone(),
        common::random_weights(&config, dtype, &device)?,
        false,
    )?;
    let adapter = AdapterConfig {
        method: "sac".into(),
        ratio: args.ratio,
        chunk_size: args.tokens,
        mem_size: chunk::mem_size(args.tokens, args.ratio),
        lora_rank: args.rank,
        lora_scale: 2.0,
        lora_targets: vec!["q_proj".into(), "v_proj".into()],
        base_model: "random Llama-3.2-1B shape".into(),
        base_model_fingerprint: None,
    };
    let params = Trainables::init(sac::adapter::Config::Sac(adapter), &decoder, 0)?;
    let trainable: usize = params.vars().iter().map(|v| v.elem_count()).sum();
    let mut optimizer = AdamW::new(&params.vars(), 0.0)?;
    let init_s = t0.elapsed().as_secs_f64();
    let rss_before_step = status_gib("VmRSS:");

    let vocab = config.vocab_size as u32;
    let ids = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7919 + salt) % vocab).collect()
    };
    let sample = Sample {
        context: ids(args.tokens, 1),
        prompt: Vec::new(),
        target: ids(args.continuation, 2),
    };
    let t1 = Instant::now();
    let (loss, mut grads) = step::backward(&decoder, &params, &[sample], 1.0)?;
    let grad_norm = clip_global_norm(&mut grads, 2.0)?;
    optimizer.step(&params.vars(), &grads, 1e-4)?;
    let step_s = t1.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "train_step",
            "model": "Llama-3.2-1B shape, random weights",
            "layers": config.num_layers,
            "threads": candle_core::utils::get_num_threads(),
            "device": args.device.to_string(),
            "dtype": format!("{dtype:?}").to_lowercase(),
            "context_tokens": args.tokens,
            "continuation_tokens": args.continuation,
            "lora_rank": args.rank,
            "trainable_params": trainable,
            "init_s": init_s,
            "step_s": step_s,
            "loss": loss,
            "grad_norm": grad_norm,
            "rss_before_step_gib": rss_before_step,
            "peak_rss_gib": status_gib("VmHWM:"),
        })
    );
    Ok(())
}
