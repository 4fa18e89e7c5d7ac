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
//! - `decoder.layers.{i}.{self_attn|mlp}.{proj}.lora_{a|b}`: with
//!   `decoder_lora` in the config (stage 2), LoRA on the decoder, every
//!   layer of the base model, which `sac ask` then answers with.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{
    AdapterProblem, TrainedOn, adapter_error, lora_layers, parse_config, read_config, read_weights,
};
use crate::compress::gmsa::METHOD as GMSA;
use crate::error::Result;
use crate::model::{Layers, LoraTarget, ModelConfig, ModelLora};

/// The prefix of the decoder LoRA's tensor names.
pub const DECODER_PREFIX: &str = "decoder.";

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
    /// The decoder's LoRA, trained by stage 2; absent when the decoder is
    /// the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_lora: Option<DecoderLora>,
}

/// The shape of the decoder's LoRA, on every layer of the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderLora {
    pub rank: usize,
    /// `alpha / rank`.
    pub scale: f64,
    /// The adapted projections by name.
    pub targets: Vec<String>,
}

impl GmsaConfig {
    /// Reads and checks `adapter_config.json` in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let (path, text) = read_config(dir)?;
        parse_config(&path, &text, GmsaConfig::validate)
    }

    pub(super) fn validate(&self) -> std::result::Result<(), AdapterProblem> {
        if self.method != GMSA.name {
            return Err(AdapterProblem::Method {
                found: self.method.clone(),
                expected: GMSA.name,
            });
        }
        if self.merge_size == 0 || self.lora_rank == 0 {
            return Err(AdapterProblem::NotPositive("merge_size and lora_rank"));
        }
        if self.decoder_lora.as_ref().is_some_and(|d| d.rank == 0) {
            return Err(AdapterProblem::NotPositive("decoder_lora.rank"));
        }
        let decoder_targets = self.decoder_lora.iter().flat_map(|d| &d.targets);
        if let Some(t) = self
            .lora_targets
            .iter()
            .chain(decoder_targets)
            .find(|t| LoraTarget::from_name(t).is_none())
        {
            return Err(AdapterProblem::UnknownTarget {
                name: t.clone(),
                known: LoraTarget::names(&LoraTarget::ALL),
            });
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
    /// LoRA on every layer of the decoder, when stage 2 trained one.
    pub decoder_lora: Option<ModelLora>,
}

impl GmsaAdapter {
    /// Reads an adapter directory and checks it against the model's shapes.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let config = GmsaConfig::load(dir)?;
        let (path, tensors) = read_weights(dir, device)?;
        Self::from_tensors(config, tensors, model, dtype).map_err(|e| adapter_error(&path, e))
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
        let layers = lora_layers(
            &mut tensors,
            "encoder.",
            config.encoder_layers,
            &LoraTarget::from_names(&config.lora_targets),
            (config.lora_rank, config.lora_scale),
            model,
            dtype,
        )?;
        let decoder_lora = match &config.decoder_lora {
            Some(d) => Some(ModelLora {
                layers: lora_layers(
                    &mut tensors,
                    DECODER_PREFIX,
                    model.num_layers,
                    &LoraTarget::from_names(&d.targets),
                    (d.rank, d.scale),
                    model,
                    dtype,
                )?,
            }),
            None => None,
        };
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
            decoder_lora,
        })
    }
}
