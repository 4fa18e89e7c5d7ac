//! `sac model-info`: resolve, load and fingerprint a model, and describe it.

use std::io::Write;

use anyhow::Context;
use serde::Serialize;

use crate::cli::ModelInfoArgs;
use sac::fingerprint::ModelFingerprint;
use sac::model::config::RopeScaling;
use sac::runtime::LoadedModel;

#[derive(Serialize)]
struct ModelInfo {
    id: String,
    revision: Option<String>,
    architecture: &'static str,
    layers: usize,
    hidden_size: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    rope_theta: f64,
    rope_scaling: String,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    /// Whether the model has a chat template (`compress --prompt auto` uses it).
    chat_template: bool,
    weight_files: usize,
    weight_bytes: u64,
    device: String,
    dtype: String,
    /// Bytes of K and V per token in bf16, over all layers.
    kv_bytes_per_token_bf16: usize,
    fingerprint: ModelFingerprint,
}

pub fn run(args: &ModelInfoArgs) -> anyhow::Result<()> {
    let LoadedModel {
        files,
        config,
        decoder,
        tokenizer,
        fingerprint,
    } = LoadedModel::load(&args.model.spec())?;
    let device = decoder.device();
    let dtype = decoder.dtype();
    let weight_files = files.weight_files();
    let weight_bytes = weight_files
        .iter()
        .map(|w| {
            w.metadata()
                .map(|m| m.len())
                .with_context(|| format!("cannot stat {}", w.display()))
        })
        .sum::<anyhow::Result<u64>>()?;
    let info = ModelInfo {
        id: files.id.clone(),
        revision: files.revision.clone(),
        architecture: config.architecture.name(),
        layers: config.num_layers,
        hidden_size: config.hidden_size,
        heads: config.num_heads,
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        vocab_size: config.vocab_size,
        max_position_embeddings: config.max_position_embeddings,
        rope_theta: config.rope_theta,
        rope_scaling: match &config.rope_scaling {
            RopeScaling::None => "none".into(),
            RopeScaling::Linear { factor } => format!("linear x{factor}"),
            RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
            RopeScaling::Factors(f) => format!("{} frequency factors (GGUF rope_freqs)", f.len()),
        },
        bos_token_id: tokenizer.bos(),
        eos_token_ids: tokenizer.eos().to_vec(),
        chat_template: tokenizer.chat_template().is_some(),
        weight_files: weight_files.len(),
        weight_bytes,
        device: match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            other => format!("{other:?}").to_lowercase(),
        },
        dtype: format!("{dtype:?}").to_lowercase(),
        kv_bytes_per_token_bf16: config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2,
        fingerprint,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &info)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &info)?;
    }
    Ok(())
}

fn write_text(out: &mut impl Write, i: &ModelInfo) -> std::io::Result<()> {
    let revision = i
        .revision
        .as_deref()
        .map(|r| format!(" @ {r}"))
        .unwrap_or_default();
    let eos: Vec<String> = i.eos_token_ids.iter().map(u32::to_string).collect();
    let bos = i.bos_token_id.map_or("none".into(), |b| b.to_string());
    writeln!(out, "model         {}{revision}", i.id)?;
    writeln!(
        out,
        "architecture  {}: {} layers, hidden {}, {} heads, {} KV heads, head dim {}",
        i.architecture, i.layers, i.hidden_size, i.heads, i.kv_heads, i.head_dim
    )?;
    writeln!(
        out,
        "vocabulary    {} tokens, BOS {bos}, EOS {}",
        i.vocab_size,
        eos.join(" ")
    )?;
    writeln!(
        out,
        "prompt        {}",
        if i.chat_template {
            "a chat template (compress uses the chat layout by default)"
        } else {
            "no chat template (the raw layout)"
        }
    )?;
    writeln!(
        out,
        "context       {} positions, RoPE theta {} (scaling: {})",
        i.max_position_embeddings, i.rope_theta, i.rope_scaling
    )?;
    writeln!(
        out,
        "weights       {} file(s), {:.1} MB, loaded as {} on {}",
        i.weight_files,
        i.weight_bytes as f64 / 1e6,
        i.dtype,
        i.device
    )?;
    writeln!(
        out,
        "KV per token  {} bytes in bf16 (before compression)",
        i.kv_bytes_per_token_bf16
    )?;
    writeln!(out, "fingerprint   {}", i.fingerprint.model)?;
    writeln!(out, "tokenizer     {}", i.fingerprint.tokenizer)
}
