//! What the benches share: a random-weight model of Llama-3.2-1B's shape
//! (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocab 128256,
//! tied embeddings), built in memory.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sac::model::{Decoder, ModelConfig};

const LLAMA_3_2_1B: &str = r#"{
  "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
  "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
  "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 131072,
  "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
  "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": 128001
}"#;

/// The model config of Llama-3.2-1B.
pub fn llama_3_2_1b() -> anyhow::Result<ModelConfig> {
    ModelConfig::from_json(LLAMA_3_2_1B).map_err(anyhow::Error::msg)
}

/// A decoder of `config`'s shape with N(0, 0.02) weights and unit norms.
pub fn random_decoder(c: &ModelConfig, dtype: DType, device: &Device) -> anyhow::Result<Decoder> {
    Ok(Decoder::load(c.clone(), random_weights(c, dtype, device)?)?)
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
