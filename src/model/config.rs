//! `config.json` as written by Hugging Face transformers, for the decoder
//! families `sac` runs: Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5 and Qwen3.
//!
//! They share one block structure and differ only in a few switches (biases,
//! q/k norms, RoPE scaling), so one config type describes them all.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The decoder family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            "qwen3" => Some(Architecture::Qwen3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

/// How RoPE frequencies are derived from the base frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// The i-th frequency divided by the i-th factor: llama.cpp's
    /// `rope_freqs` tensor, in which a GGUF file stores Llama 3.1's scaling.
    Factors(Vec<f64>),
}

/// The validated description of a model, everything the forward pass needs.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// The MLP projections carry biases (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Attention span of sliding-window models (Mistral v0.1), when in use.
    pub sliding_window: Option<usize>,
}

/// One id or a list of ids, as `eos_token_id` may be either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    /// transformers 5 moves `rope_theta` and the scaling into this one object.
    rope_parameters: Option<RawRope>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

/// Why a model's configuration (its `config.json`, a GGUF file's metadata,
/// a weight index) is not one sac can run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not a model config: {0}")]
    NotConfig(serde_json::Error),
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("not a safetensors index: {0}")]
    NotIndex(serde_json::Error),
    #[error("shard name `{0}` is not a plain file name")]
    ShardName(String),
    #[error("model_type `{0}` is not supported (sac runs llama, mistral, qwen2 and qwen3)")]
    ModelType(String),
    #[error("hidden_act `{0}` is not supported (only silu)")]
    Activation(String),
    #[error("heads and layers must be positive")]
    NotPositive,
    #[error("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")]
    Heads { heads: usize, kv_heads: usize },
    #[error("head_dim {0} must be even and positive")]
    HeadDim(usize),
    #[error("rope scaling lacks `{0}`")]
    RopeLacks(&'static str),
    #[error("rope scaling `{0}` is not supported (default, linear and llama3 are)")]
    RopeType(String),
    /// candle could not read the file; `cause` is the first line of its
    /// error (the rest is a backtrace when `RUST_BACKTRACE` is set).
    #[error("not a GGUF file sac can read: {cause}")]
    NotGguf { cause: String },
    #[error("`{0}` is not a string")]
    NotString(String),
    #[error("has no `{0}`")]
    NoKey(String),
    #[error("has no number `{0}`")]
    NoNumber(String),
    #[error("has no count `{0}`")]
    NoCount(String),
    #[error("has no vocabulary size")]
    NoVocabulary,
    #[error("architecture {0:?} is not supported (sac runs llama, qwen2 and qwen3 GGUF files)")]
    GgufArchitecture(String),
    #[error("RoPE scaling {0} is not supported (only linear)")]
    GgufRopeScaling(String),
    #[error("`{name}` is not {count} positive factors")]
    RopeFactors { name: &'static str, count: usize },
    #[error("holds a tensor `{0}` sac does not know")]
    UnknownTensor(String),
    /// As [`ConfigError::NotGguf`], the first line of candle's error.
    #[error("weights: {cause}")]
    Weights { cause: String },
    /// As [`ConfigError::NotGguf`], the first line of candle's error.
    #[error("tensor `{name}`: {cause}")]
    Tensor { name: String, cause: String },
}

impl ConfigError {
    /// `error` attributed to the file at `path`.
    pub fn at(self, path: &Path) -> Error {
        Error::Config {
            path: path.to_path_buf(),
            problem: self,
        }
    }
}

/// The first line of `error`: candle's errors carry a backtrace on the
/// lines after it when `RUST_BACKTRACE` is set.
pub fn first_line(error: &impl std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("cannot read model config", path, e))?;
        Self::from_json(&text).map_err(|problem| problem.at(path))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(ConfigError::NotConfig)?;
        let architecture = Architecture::from_model_type(&raw.model_type)
            .ok_or_else(|| ConfigError::ModelType(raw.model_type.clone()))?;
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ConfigError::Activation(act.into()));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0 || num_kv_heads == 0 || raw.num_hidden_layers == 0 {
            return Err(ConfigError::NotPositive);
        }
        if !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ConfigError::Heads {
                heads: raw.num_attention_heads,
                kv_heads: num_kv_heads,
            });
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ConfigError::HeadDim(head_dim));
        }
        let rope = raw.rope_parameters.or(raw.rope_scaling);
        let rope_theta = rope
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let rope_scaling = rope.map(parse_rope_scaling).transpose()?;
        let qwen2 = architecture == Architecture::Qwen2;
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling: rope_scaling.unwrap_or(RopeScaling::None),
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias: qwen2 || raw.attention_bias,
            o_bias: !qwen2 && raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: raw.bos_token_id.and_then(|ids| match ids {
                TokenIds::One(id) => Some(id),
                TokenIds::Many(ids) => ids.first().copied(),
            }),
            eos_token_ids: match raw.eos_token_id {
                Some(TokenIds::One(id)) => vec![id],
                Some(TokenIds::Many(ids)) => ids,
                None => Vec::new(),
            },
            sliding_window: raw.sliding_window.filter(|&w| {
                raw.use_sliding_window != Some(false) && w < raw.max_position_embeddings
            }),
        })
    }

    /// Query heads per KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

fn parse_rope_scaling(raw: RawRope) -> std::result::Result<RopeScaling, ConfigError> {
    let need = |v: Option<f64>, name: &'static str| v.ok_or(ConfigError::RopeLacks(name));
    match raw.rope_type.as_deref() {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear {
            factor: need(raw.factor, "factor")?,
        }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: need(raw.factor, "factor")?,
            low_freq_factor: need(raw.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(raw.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: need(
                raw.original_max_position_embeddings,
                "original_max_position_embeddings",
            )?,
        }),
        Some(other) => Err(ConfigError::RopeType(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_3_2_1B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
      "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
      "max_position_embeddings": 131072, "mlp_bias": false, "attention_bias": false,
      "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": true,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "torch_dtype": "bfloat16", "vocab_size": 128256
    }"#;

    #[test]
    fn reads_llama_3_2_config() {
        let c = ModelConfig::from_json(LLAMA_3_2_1B).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.num_layers, c.num_heads, c.num_kv_heads), (16, 32, 8));
        assert_eq!((c.head_dim, c.group_size()), (64, 4));
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.as_slice()),
            (Some(128000), &[128001][..])
        );
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = r#"{"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 64, "eos_token_id": [3, 4],
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
    }

    #[test]
    fn sliding_window_counts_only_when_used() {
        let with = |extra: &str| {
            let text = LLAMA_3_2_1B.replace(
                "\"model_type\": \"llama\"",
                &format!("\"model_type\": \"mistral\", {extra}"),
            );
            ModelConfig::from_json(&text).unwrap().sliding_window
        };
        assert_eq!(with("\"sliding_window\": 4096"), Some(4096));
        assert_eq!(
            with("\"sliding_window\": 4096, \"use_sliding_window\": false"),
            None
        );
        assert_eq!(with("\"sliding_window\": null"), None);
    }

    #[test]
    fn qwen2_has_qkv_bias_but_no_o_bias() {
        let text = LLAMA_3_2_1B.replace("\"model_type\": \"llama\"", "\"model_type\": \"qwen2\"");
        let c = ModelConfig::from_json(&text).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn rejects_unknown_architectures_and_rope_types() {
        let gpt = LLAMA_3_2_1B.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
        assert!(
            ModelConfig::from_json(&gpt)
                .unwrap_err()
                .to_string()
                .contains("gpt2")
        );
        let yarn = LLAMA_3_2_1B.replace("\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\"");
        assert!(
            ModelConfig::from_json(&yarn)
                .unwrap_err()
                .to_string()
                .contains("yarn")
        );
        let bad_gqa =
            LLAMA_3_2_1B.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5");
        assert!(ModelConfig::from_json(&bad_gqa).is_err());
    }
}
