//! What the benches share: where they run, random-weight decoders of real
//! models' shapes, and whole model directories (config, weights, a BPE
//! tokenizer trained on the bench's own text) that the `sac` binary loads.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sac::device::{DTypeSpec, DeviceSpec, Workload};
use sac::model::{Decoder, ModelConfig};
use serde_json::{Value, json};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The `sac` binary's allocator (src/main.rs), so that what a bench times
/// and its peak memory in this process are what the binary would show.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs `cmd` to completion; its output, or an error with its stderr.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// Where a bench runs.
#[derive(clap::Args)]
pub struct Placement {
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeSpec,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Placement {
    /// A decoder of `config`'s shape with random weights, placed and packed
    /// as `sac` would for inference; with a name for its precision.
    pub fn random_decoder(&self, config: &ModelConfig) -> anyhow::Result<(Decoder, String)> {
        let device = self.device.open()?;
        let precision = self.dtype.resolve(&device, Workload::Inference);
        let vb = random_weights(config, precision.dtype, &device)?;
        let decoder = Decoder::load(config.clone(), vb, precision.bf16_weights)?;
        let mut name = format!("{:?}", precision.dtype).to_lowercase();
        if precision.bf16_weights {
            name.push_str(" (bf16 weights)");
        }
        Ok((decoder, name))
    }
}

/// Llama-3.2-1B's `config.json` (vocabulary included).
pub const LLAMA_3_2_1B: &str = r#"{
  "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
  "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
  "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 131072,
  "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
  "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": 128001
}"#;

/// Qwen2.5-0.5B's shape as a Llama config (no q/k/v biases, no vocabulary:
/// the directory's tokenizer sets it).
pub fn qwen_0_5b_shape() -> Value {
    json!({
        "model_type": "llama", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": true
    })
}

/// A decoder's weights for `c`, from [`random_tensors`].
pub fn random_weights(
    c: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    let tensors = random_tensors(c, dtype, device)?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// Random tensors for every weight of `c`, named as in transformers
/// checkpoints: N(0, 0.02) matrices, norms of ones.
pub fn random_tensors(
    c: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let (h, hd, m) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
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
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = if shape.len() == 1 {
                Tensor::ones(shape, dtype, device)?
            } else {
                Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
            };
            Ok((name, t))
        })
        .collect()
}

const BOS: &str = "<|bos|>";
const EOS: &str = "<|eos|>";

/// A byte-level BPE tokenizer of `vocab_size` ids (BOS and EOS last) trained
/// on `corpus`, which prepends BOS as Llama's does.
fn train_tokenizer(corpus: &[String], vocab_size: usize) -> anyhow::Result<Tokenizer> {
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size - 2)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(anyhow::Error::msg)?;
    tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
    let bos = tokenizer.token_to_id(BOS).context("BOS was not added")?;
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(anyhow::Error::msg)?
        .special_tokens(vec![(BOS, bos)])
        .build()?;
    tokenizer.with_post_processor(Some(template));
    Ok(tokenizer)
}

/// Writes `config` (a Llama config without vocabulary) and a tokenizer
/// trained on `corpus` to `dir`; returns the config with its vocabulary.
pub fn write_config_and_tokenizer(
    dir: &Path,
    mut config: Value,
    corpus: &[String],
    vocab_size: usize,
) -> anyhow::Result<ModelConfig> {
    let tokenizer = train_tokenizer(corpus, vocab_size)?;
    let vocab = tokenizer.get_vocab_size(true);
    let (bos, eos) = (tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS));
    config["vocab_size"] = json!(vocab);
    config["bos_token_id"] = json!(bos);
    config["eos_token_id"] = json!(eos);
    std::fs::create_dir_all(dir)?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    let tokenizer_config = json!({"bos_token": BOS, "eos_token": EOS, "add_bos_token": true});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )?;
    std::fs::write(dir.join("config.json"), config.to_string())?;
    ModelConfig::from_json(&config.to_string()).map_err(anyhow::Error::msg)
}

/// Writes a loadable model directory to `dir`: `config` with random bf16
/// weights and a tokenizer trained on `corpus`.
pub fn write_model_dir(
    dir: &Path,
    config: Value,
    corpus: &[String],
    vocab_size: usize,
) -> anyhow::Result<()> {
    let c = write_config_and_tokenizer(dir, config, corpus, vocab_size)?;
    let tensors = random_tensors(&c, DType::BF16, &Device::Cpu)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}
