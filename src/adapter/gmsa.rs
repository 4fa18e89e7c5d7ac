//! GMSA adapters: the trained parts of GMSA's compressor, stored as SAC's
//! are (`adapter.safetensors` and `adapter_config.json`).
//!
//! - `encoder.layers.{i}.{self_attn|mlp}.{proj}.lora_{a|b}`: LoRA on the
//!   listed linear layers of the encoder, the base model's first
//!   `encoder_layers` layers; `a` is `[in, rank]`, `b` `[rank, out]`.
//! - `lsa.layers.{j}.*`: the layer-semantic-alignment block, `lsa_layers`
//!   whole layers named as a model's (`input_layernorm.weight`,
//!   `self_attn.q_proj.weight`, ...), trained from copies of the base
//!   model's first layers.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{AdapterProblem, CONFIG_FILE, TrainedOn, WEIGHTS_FILE, adapter_error};
use crate::compress::gmsa::METHOD as GMSA;
use crate::error::{Error, Result};
use crate::model::{LayerLora, Layers, LoraTarget, LowRank, ModelConfig, ModelLora};

/// A GMSA `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GmsaConfig {
    /// Always `gmsa`.
    pub method: String,
    /// The base model, as [`super::AdapterConfig::base_model`].
    pub base_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_fingerprint: Option<String>,
    /// Layers of the base model the encoder runs.
    pub encoder_layers: usize,
    /// Document tokens pooled into one soft token.
    pub merge_size: usize,
    /// Layers of the alignment block.
    pub lsa_layers: usize,
    pub lora_rank: usize,
    /// `alpha / rank`.
    pub lora_scale: f64,
    /// The encoder's adapted projections by name (PEFT's `all-linear` is
    /// all seven).
    pub lora_targets: Vec<String>,
}

impl GmsaConfig {
    /// Reads and checks `adapter_config.json` in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io("cannot read adapter config", &path, e))?;
        let config: GmsaConfig = serde_json::from_str(&text)
            .map_err(|e| adapter_error(&path, AdapterProblem::NotConfig(e)))?;
        config.validate().map_err(|e| adapter_error(&path, e))?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), AdapterProblem> {
        if self.method != GMSA.name {
            return Err(AdapterProblem::Method {
                found: self.method.clone(),
                expected: GMSA.name,
            });
        }
        if self.merge_size == 0 || self.lora_rank == 0 {
            return Err(AdapterProblem::NotPositive);
        }
        if let Some(t) = self
            .lora_targets
            .iter()
            .find(|t| LoraTarget::from_name(t).is_none())
        {
            return Err(AdapterProblem::UnknownTarget(t.clone()));
        }
        Ok(())
    }

    /// Refuses layer counts `model` does not have.
    fn fits(&self, model: &ModelConfig) -> std::result::Result<(), AdapterProblem> {
        for (what, count) in [
            ("encoder_layers", self.encoder_layers),
            ("lsa_layers", self.lsa_layers),
        ] {
            if count == 0 || count > model.num_layers {
                return Err(AdapterProblem::Layers {
                    what,
                    count,
                    most: model.num_layers,
                });
            }
        }
        Ok(())
    }
}

impl TrainedOn for GmsaConfig {
    fn base_model(&self) -> &str {
        &self.base_model
    }

    fn base_model_fingerprint(&self) -> Option<&str> {
        self.base_model_fingerprint.as_deref()
    }
}

/// A loaded GMSA adapter, on the model's device and in its dtype.
#[derive(Debug, Clone)]
pub struct GmsaAdapter {
    pub config: GmsaConfig,
    /// LoRA on the encoder's `encoder_layers` layers.
    pub encoder_lora: ModelLora,
    /// The alignment block.
    pub lsa: Layers,
}

impl GmsaAdapter {
    /// Reads an adapter directory and checks it against the model's shapes.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let config = GmsaConfig::load(dir)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(adapter_error(dir, AdapterProblem::NoWeights));
        }
        let tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| adapter_error(&weights, AdapterProblem::Unreadable(e)))?;
        Self::from_tensors(config, tensors, model, dtype).map_err(|e| adapter_error(&weights, e))
    }

    /// Builds the adapter from tensors named as in `adapter.safetensors`.
    pub fn from_tensors(
        config: GmsaConfig,
        mut tensors: HashMap<String, Tensor>,
        model: &ModelConfig,
        dtype: DType,
    ) -> std::result::Result<Self, AdapterProblem> {
        config.validate()?;
        config.fits(model)?;
        let targets = LoraTarget::from_names(&config.lora_targets);
        let rank = config.lora_rank;
        let mut take = |name: String, shape: [usize; 2]| {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| AdapterProblem::NoTensor(name.clone()))?;
            if t.dims() != shape {
                return Err(AdapterProblem::Shape {
                    name,
                    shape: t.dims().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            t.to_dtype(dtype)
                .map_err(|source| AdapterProblem::Cast { name, source })
        };
        let layers = (0..config.encoder_layers)
            .map(|i| {
                LayerLora::try_from_fn(|target| {
                    if !targets.contains(&target) {
                        return Ok(None);
                    }
                    let (inputs, outputs) = target.features(model);
                    let stem = format!("encoder.{}", target.tensor_stem(i));
                    Ok(Some(LowRank {
                        a: take(format!("{stem}.lora_a"), [inputs, rank])?,
                        b: take(format!("{stem}.lora_b"), [rank, outputs])?,
                        scale: config.lora_scale,
                    }))
                })
            })
            .collect::<std::result::Result<_, AdapterProblem>>()?;
        let (lsa, rest): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
            .into_iter()
            .partition(|(name, _)| name.starts_with("lsa."));
        if let Some(extra) = rest.keys().min() {
            return Err(AdapterProblem::Extra(extra.clone()));
        }
        let device = lsa
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone());
        let count = lsa.len();
        let vb = VarBuilder::from_tensors(lsa, dtype, &device);
        let lsa = Layers::load(model, vb.pp("lsa.layers"), config.lsa_layers)
            .map_err(|e| AdapterProblem::Lsa(Box::new(e)))?;
        if count != lsa.tensor_count() {
            return Err(AdapterProblem::LsaTensors {
                found: count,
                expected: lsa.tensor_count(),
            });
        }
        Ok(GmsaAdapter {
            config,
            encoder_lora: ModelLora { layers },
            lsa,
        })
    }
}
