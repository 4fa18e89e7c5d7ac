//! llama.cpp's GGUF files: the config (as metadata), the tokenizer and the
//! weights, quantized or not, in one file. candle's `gguf_file` reads it and
//! its quantized module dequantizes each tensor as the decoder loads it, to
//! the run dtype; the tensors are renamed to the Hugging Face names the
//! decoder loads.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` of
//! Llama-family models (its RoPE rotates adjacent pairs, Hugging Face's the
//! two halves of a head); the loader undoes that, so the decoder runs GGUF
//! and safetensors weights alike. Qwen2 and Qwen3 files are not permuted.

mod tokenizer;

pub use tokenizer::GgufTokenizerError;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::config::{ConfigError, RopeScaling, first_line};
use crate::model::{Decoder, ModelConfig};
use crate::tokens::TextTokenizer;

/// An open GGUF file: its metadata and where its tensors lie.
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: Content,
}

/// The tensor in which llama.cpp stores per-pair RoPE frequency divisors.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The architectures sac runs, as GGUF names them, and whether llama.cpp
/// permuted their query and key rows.
const ARCHITECTURES: [(&str, bool); 3] = [("llama", true), ("qwen2", false), ("qwen3", false)];

/// A metadata value as a number, whatever its numeric type.
fn numeric(value: &Value) -> Option<f64> {
    match value {
        Value::U8(v) => Some(f64::from(*v)),
        Value::I8(v) => Some(f64::from(*v)),
        Value::U16(v) => Some(f64::from(*v)),
        Value::I16(v) => Some(f64::from(*v)),
        Value::U32(v) => Some(f64::from(*v)),
        Value::I32(v) => Some(f64::from(*v)),
        Value::U64(v) => Some(*v as f64),
        Value::I64(v) => Some(*v as f64),
        Value::F32(v) => Some(f64::from(*v)),
        Value::F64(v) => Some(*v),
        _ => None,
    }
}

fn open_file(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io("cannot open", path, e))
}

impl GgufModel {
    /// Reads the metadata and tensor directory of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // Buffered: the metadata is thousands of small reads (a vocabulary's
        // strings), each a system call on a bare file.
        let mut file = std::io::BufReader::new(open_file(path)?);
        let content = Content::read(&mut file).map_err(|e| {
            ConfigError::NotGguf {
                cause: first_line(&e),
            }
            .at(path)
        })?;
        Ok(GgufModel {
            path: path.to_path_buf(),
            content,
        })
    }

    fn error(&self, problem: ConfigError) -> Error {
        problem.at(&self.path)
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.error(ConfigError::NotString(key.into()))),
            None => Err(self.error(ConfigError::NoKey(key.into()))),
        }
    }

    fn number(&self, key: &str) -> Option<f64> {
        numeric(self.meta(key)?)
    }

    /// The numbers of array `key` (a non-number counts as 0); empty when
    /// there is no such array.
    fn numbers(&self, key: &str) -> Vec<f64> {
        match self.meta(key) {
            Some(Value::Array(items)) => items.iter().map(|v| numeric(v).unwrap_or(0.0)).collect(),
            _ => Vec::new(),
        }
    }

    fn id(&self, key: &str) -> Option<u32> {
        self.number(key)
            .filter(|v| *v >= 0.0 && v.fract() == 0.0 && *v <= f64::from(u32::MAX))
            .map(|v| v as u32)
    }

    /// `general.architecture`, if sac runs it, and whether its query and
    /// key rows are permuted.
    fn architecture(&self) -> Result<(&str, bool)> {
        let arch = self.string("general.architecture")?;
        ARCHITECTURES
            .iter()
            .find(|(name, _)| *name == arch)
            .map(|&(name, permuted)| (name, permuted))
            .ok_or_else(|| self.error(ConfigError::GgufArchitecture(arch.into())))
    }

    /// The model's hyper-parameters, from `<arch>.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let (arch, _) = self.architecture()?;
        let optional = |key: &str| self.number(&format!("{arch}.{key}"));
        let need = |key: &str| {
            optional(key).ok_or_else(|| self.error(ConfigError::NoNumber(format!("{arch}.{key}"))))
        };
        let count = |key: &str| -> Result<u64> {
            let key = format!("{arch}.{key}");
            self.id(&key)
                .map(u64::from)
                .ok_or_else(|| self.error(ConfigError::NoCount(key.clone())))
        };
        let optional_count = |key: &str| self.id(&format!("{arch}.{key}")).map(u64::from);
        let rope_scaling = match self.meta(&format!("{arch}.rope.scaling.type")) {
            None => serde_json::Value::Null,
            Some(Value::String(kind)) if kind == "none" => serde_json::Value::Null,
            Some(Value::String(kind)) if kind == "linear" => {
                json!({"type": "linear", "factor": optional("rope.scaling.factor").unwrap_or(1.0)})
            }
            Some(other) => {
                return Err(self.error(ConfigError::GgufRopeScaling(format!("{other:?}"))));
            }
        };
        let heads = count("attention.head_count")?;
        let vocab =
            optional_count("vocab_size").or_else(|| match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => Some(tokens.len() as u64),
                _ => None,
            });
        let config = json!({
            "model_type": arch,
            "hidden_size": count("embedding_length")?,
            "intermediate_size": count("feed_forward_length")?,
            "num_hidden_layers": count("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": optional_count("attention.head_count_kv").unwrap_or(heads),
            "head_dim": optional_count("attention.key_length"),
            "rms_norm_eps": need("attention.layer_norm_rms_epsilon")?,
            "rope_theta": optional("rope.freq_base").unwrap_or(10_000.0),
            "rope_scaling": rope_scaling,
            "max_position_embeddings": count("context_length")?,
            "vocab_size": vocab.ok_or_else(|| self.error(ConfigError::NoVocabulary))?,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "attention_bias": self.content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            "mlp_bias": self.content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
            "bos_token_id": self.id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.id("tokenizer.ggml.eos_token_id"),
        });
        let mut config = ModelConfig::from_json(&config.to_string()).map_err(|p| self.error(p))?;
        if let Some(factors) = self.rope_factors(config.head_dim)? {
            config.rope_scaling = RopeScaling::Factors(factors);
        }
        Ok(config)
    }

    /// `rope_freqs.weight`, one divisor per rotation pair, in which llama.cpp
    /// stores Llama 3.1's RoPE scaling.
    fn rope_factors(&self, head_dim: usize) -> Result<Option<Vec<f64>>> {
        let Some(info) = self.content.tensor_infos.get(ROPE_FREQS) else {
            return Ok(None);
        };
        let factors: Vec<f32> = self
            .dequantized(&mut open_file(&self.path)?, ROPE_FREQS, info)?
            .flatten_all()?
            .to_vec1()?;
        if factors.len() != head_dim / 2 || factors.iter().any(|f| !f.is_finite() || *f <= 0.0) {
            return Err(self.error(ConfigError::RopeFactors {
                name: ROPE_FREQS,
                count: head_dim / 2,
            }));
        }
        Ok(Some(factors.into_iter().map(f64::from).collect()))
    }

    /// The tokenizer from `tokenizer.ggml.*`, with BOS (when
    /// `add_bos_token` is set) and the EOS and end-of-turn ids.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        tokenizer::build(self)
    }

    /// The decoder `config` describes, its tensors renamed and (for the
    /// Llama family) unpermuted, each read and dequantized to `dtype` on
    /// `device` when the decoder asks for it ([`Tensors`]): with
    /// `bf16_weights` a projection's f32 copy lives only until it is
    /// packed, and the whole model is never held in f32.
    pub fn decoder(
        &self,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
        bf16_weights: bool,
    ) -> Result<Decoder> {
        let (_, permuted) = self.architecture()?;
        let by_hf_name = self
            .content
            .tensor_infos
            .iter()
            .filter(|(name, _)| name.as_str() != ROPE_FREQS) // read into the config
            .map(|(name, info)| {
                let hf = hf_name(name)
                    .ok_or_else(|| self.error(ConfigError::UnknownTensor(name.clone())))?;
                Ok((hf, (name.as_str(), info)))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let tensors = Tensors {
            model: self,
            by_hf_name,
            permuted: permuted.then_some((config.num_heads, config.num_kv_heads)),
            failed: Mutex::new(None),
        };
        let failed = |tensors: &Tensors| tensors.failed.lock().ok().and_then(|mut f| f.take());
        let vb = VarBuilder::from_backend(Box::new(&tensors), dtype, device.clone());
        Decoder::load(config, vb, bf16_weights).map_err(|e| match (failed(&tensors), e) {
            // The tensor that could not be read, as its own error.
            (Some(read), _) => read,
            (None, Error::Candle(e)) => self.error(ConfigError::Weights {
                cause: first_line(&e),
            }),
            (None, other) => other,
        })
    }

    /// Tensor `name` (described by `info`) read from `file`, this model's
    /// file, and dequantized to f32 on the CPU by candle.
    fn dequantized(&self, file: &mut File, name: &str, info: &TensorInfo) -> Result<Tensor> {
        info.read(file, self.content.tensor_data_offset, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| {
                self.error(ConfigError::Tensor {
                    name: name.into(),
                    cause: first_line(&e),
                })
            })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The Hugging Face name of GGUF tensor `name`.
fn hf_name(name: &str) -> Option<String> {
    let global = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(global) = global {
        return Some(global.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's row permutation of a `[heads * head_dim, in]` query
/// or key weight (or `[heads * head_dim]` bias): within each head, rows
/// `0, 2, 4, ...` then `1, 3, 5, ...` become the halves Hugging Face's RoPE
/// rotates.
fn unpermute(tensor: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(tensor
        .reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// A GGUF file's tensors under their Hugging Face names, as a `VarBuilder`
/// source that reads and dequantizes each one when it is asked for, each
/// read on a file handle of its own (the decoder loads its blocks in
/// parallel).
struct Tensors<'m> {
    model: &'m GgufModel,
    by_hf_name: HashMap<String, (&'m str, &'m TensorInfo)>,
    /// `(heads, kv_heads)` where llama.cpp permuted the query and key rows.
    permuted: Option<(usize, usize)>,
    /// The first read that failed, returned as itself rather than as
    /// candle's error.
    failed: Mutex<Option<Error>>,
}

impl Tensors<'_> {
    fn read(&self, hf: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(&(name, info)) = self.by_hf_name.get(hf) else {
            return Err(candle_core::Error::CannotFindTensor { path: hf.into() }.into());
        };
        let read = self
            .model
            .dequantized(&mut open_file(&self.model.path)?, name, info)?;
        let tensor = match (self.permuted, hf.rsplit('.').nth(1)) {
            (Some((heads, _)), Some("q_proj")) => unpermute(&read, heads)?,
            (Some((_, kv_heads)), Some("k_proj")) => unpermute(&read, kv_heads)?,
            _ => read,
        };
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }
}

impl SimpleBackend for &Tensors<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name, dtype, device).map_err(|e| match e {
            Error::Candle(e) => e,
            other => {
                let message = other.to_string();
                if let Ok(mut failed) = self.failed.lock() {
                    failed.get_or_insert(other);
                }
                candle_core::Error::Msg(message)
            }
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.by_hf_name.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        for unknown in [
            "blk.x.attn_q.weight",
            "blk.0.attn_q.scale",
            "rope_freqs.weight",
        ] {
            assert_eq!(hf_name(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp: w.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2).
        let (heads, head_dim, cols) = (3, 4, 2);
        let hf = Tensor::arange(0f32, (heads * head_dim * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * head_dim, cols))
            .unwrap();
        let gguf = hf
            .reshape((heads, 2, head_dim / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * head_dim, cols))
            .unwrap();
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute(&gguf, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
