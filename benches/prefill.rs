//! Prefill throughput of our decoder on a random-weight model of
//! Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP
//! 8192, vocab 128256, tied embeddings), the figure to set beside
//! `scripts/bench_hf_prefill.py` on the same machine and threads.
//!
//! `cargo bench --bench prefill -- [--tokens 512] [--repeats 3] [--dtype f32]`

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Parser;
use sac::device::{DTypeSpec, DeviceSpec};
use sac::model::{AttentionMask, Decoder, ForwardInput, ModelConfig, Path};

const LLAMA_3_2_1B: &str = r#"{
  "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
  "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
  "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 131072,
  "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
  "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": 128001
}"#;

#[derive(Parser)]
struct Args {
    /// Prompt length.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Timed runs after one warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    #[arg(long, default_value = "auto")]
    dtype: DTypeSpec,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn random_weights(
    c: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    let (h, hd, m) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![c.num_heads * hd, h],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![c.num_kv_heads * hd, h],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![c.num_kv_heads * hd, h],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, c.num_heads * hd],
            ),
            (format!("{p}.mlp.gate_proj.weight"), vec![m, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![m, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, m]),
        ]);
    }
    let mut tensors = HashMap::new();
    for (name, shape) in shapes {
        let t = if shape.len() == 1 {
            Tensor::ones(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        tensors.insert(name, t);
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = args.device.open()?;
    let dtype = args.dtype.resolve(&device);
    let config = ModelConfig::from_json(LLAMA_3_2_1B).map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let decoder = Decoder::load(config.clone(), random_weights(&config, dtype, &device)?)?;
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
        let out = decoder.forward(ForwardInput {
            embeds: &embeds,
            positions: &positions,
            mask: AttentionMask::Causal,
            shared: None,
            past: None,
            lora: None,
            path: Path::Inference,
        })?;
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
            "dtype": format!("{dtype:?}").to_lowercase(),
            "device": args.device.to_string(),
            "init_s": init_s,
            "warmup_s": warmup_s,
            "best_s": times[0],
            "median_s": median,
            "tokens_per_s": n as f64 / median,
        })
    );
    Ok(())
}
