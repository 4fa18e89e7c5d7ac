//! SAC adapters: anchor role embeddings, the `[AE]`/`[LM]` special
//! embeddings and LoRA on the attention projections.
//!
//! `import_reference_pt` converts the reference implementation's PyTorch state
//! dict with candle's pickle reader, which only reads tensors: no Python, and
//! nothing in the file is executed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    AdapterProblem, TrainedOn, adapter_error, lora_layers, parse_config, read_config, read_weights,
    take,
};
use crate::compress::sac::METHOD as SAC;
use crate::error::{Error, Result};
use crate::layout::chunk;
use crate::model::{LoraTarget, ModelConfig, ModelLora};

/// `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `sac` for now.
    pub method: String,
    pub ratio: usize,
    pub chunk_size: usize,
    /// Role embeddings available: anchors in a full chunk.
    pub mem_size: usize,
    pub lora_rank: usize,
    pub lora_scale: f64,
    /// The adapted projections by name (`q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`); the paper's are `q_proj` and `v_proj`.
    pub lora_targets: Vec<String>,
    /// The base model the adapter was trained on: a Hub id, or a model
    /// directory, absolute or relative to the adapter's own directory (so an
    /// adapter shipped beside its model works from anywhere).
    pub base_model: String,
    pub base_model_fingerprint: Option<String>,
}

impl AdapterConfig {
    /// Reads and checks `adapter_config.json` in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let (path, text) = read_config(dir)?;
        parse_config(&path, &text, validate_config)
    }

    /// The adapted projections, in a fixed order (unknown names are refused
    /// by [`AdapterConfig::load`]).
    pub fn targets(&self) -> Vec<LoraTarget> {
        LoraTarget::from_names(&self.lora_targets)
    }
}

impl TrainedOn for AdapterConfig {
    fn base_model(&self) -> &str {
        &self.base_model
    }

    fn base_model_fingerprint(&self) -> Option<&str> {
        self.base_model_fingerprint.as_deref()
    }
}

/// A loaded adapter, on the model's device and in its dtype.
#[derive(Debug, Clone)]
pub struct SacAdapter {
    pub config: AdapterConfig,
    /// `[mem_size, hidden]`: added to the i-th anchor of every chunk.
    pub role_tokens: Tensor,
    /// `[2, hidden]`: row 0 `[AE]`, row 1 `[LM]`.
    pub special_tokens: Tensor,
    pub lora: ModelLora,
}

impl SacAdapter {
    /// This adapter for anchors at `ratio`: each anchor's role embedding is
    /// the one of the nearest anchor at the adapter's own ratio, the rest is
    /// kept. A ratio curriculum starts with it (ratio 4's adapter seeding
    /// ratio 8's).
    pub fn at_ratio(self, ratio: usize) -> Result<Self> {
        if ratio == self.config.ratio {
            return Ok(self);
        }
        let picked: Vec<u32> =
            chunk::nearest_anchors(self.config.chunk_size, self.config.ratio, ratio)
                .into_iter()
                .map(|i| i as u32)
                .collect();
        let config = AdapterConfig {
            ratio,
            mem_size: picked.len(),
            ..self.config
        };
        let picked = Tensor::new(picked, self.role_tokens.device())?;
        Ok(SacAdapter {
            config,
            role_tokens: self.role_tokens.index_select(&picked, 0)?,
            ..self
        })
    }

    /// Reads an adapter directory and checks it against the model's shapes.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let config = AdapterConfig::load(dir)?;
        let (path, tensors) = read_weights(dir, device)?;
        Self::from_tensors(config, tensors, model, dtype).map_err(|e| adapter_error(&path, e))
    }

    /// Builds an adapter from tensors named as in `adapter.safetensors`, cast
    /// to `dtype` (a cast `sac train` backpropagates through).
    pub(crate) fn from_tensors(
        config: AdapterConfig,
        mut tensors: HashMap<String, Tensor>,
        model: &ModelConfig,
        dtype: DType,
    ) -> std::result::Result<Self, AdapterProblem> {
        validate_config(&config)?;
        let h = model.hidden_size;
        let rank = config.lora_rank;
        let width = tensors
            .get("role_tokens")
            .and_then(|t| t.dims().get(1).copied());
        if let Some(width) = width.filter(|&w| w != h) {
            return Err(AdapterProblem::HiddenSize {
                width,
                base_model: config.base_model.clone(),
                hidden: h,
            });
        }
        let role_tokens = take(
            &mut tensors,
            "role_tokens".into(),
            &[config.mem_size, h],
            dtype,
        )?;
        let special_tokens = take(&mut tensors, "special_tokens".into(), &[2, h], dtype)?;
        let layers = lora_layers(
            &mut tensors,
            "",
            model.num_layers,
            &config.targets(),
            (rank, config.lora_scale),
            model,
            dtype,
        )?;
        if let Some(extra) = tensors.keys().min() {
            return Err(AdapterProblem::Extra(extra.clone()));
        }
        Ok(SacAdapter {
            config,
            role_tokens,
            special_tokens,
            lora: ModelLora { layers },
        })
    }

    /// The learned `[LM]` embedding `[hidden]` that precedes the question.
    pub fn lm_embedding(&self) -> Result<Tensor> {
        Ok(self.special_tokens.get(1)?)
    }

    /// The tensors as stored in `adapter.safetensors` (f32).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert("role_tokens".into(), self.role_tokens.to_dtype(DType::F32)?);
        out.insert(
            "special_tokens".into(),
            self.special_tokens.to_dtype(DType::F32)?,
        );
        for (i, layer) in self.lora.layers.iter().enumerate() {
            for target in LoraTarget::ALL {
                if let Some(lr) = layer.get(target) {
                    let p = target.tensor_stem(i);
                    out.insert(format!("{p}.lora_a"), lr.a.to_dtype(DType::F32)?);
                    out.insert(format!("{p}.lora_b"), lr.b.to_dtype(DType::F32)?);
                }
            }
        }
        Ok(out)
    }

    /// Writes the adapter directory (each file atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        super::save(dir, &self.config, self.tensors()?)
    }

    /// Converts the reference implementation's `adapter.pt` (a state dict with
    /// `role_tokens`, `special_tokens` and
    /// `model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}`; LoRA on
    /// `k_proj` or `o_proj` is read too, the targets being those layer 0 has).
    pub fn import_reference_pt(
        pt: &Path,
        settings: ImportSettings,
        model: &ModelConfig,
    ) -> Result<Self> {
        let entries = candle_core::pickle::read_all(pt)
            .map_err(|e| adapter_error(pt, AdapterProblem::NotStateDict(e)))?;
        let mut tensors = HashMap::new();
        for (name, tensor) in entries {
            let ours = if name == "role_tokens" || name == "special_tokens" {
                name.clone()
            } else {
                reference_lora_name(&name)
                    .ok_or_else(|| adapter_error(pt, AdapterProblem::Unexpected(name.clone())))?
            };
            if tensors
                .insert(ours.clone(), tensor.to_dtype(DType::F32)?)
                .is_some()
            {
                return Err(adapter_error(pt, AdapterProblem::TwoMapTo { ours, name }));
            }
        }
        let role = tensors
            .get("role_tokens")
            .ok_or_else(|| adapter_error(pt, AdapterProblem::NoRoleTokens))?;
        let mem_size = role.dim(0)?;
        let first_a = |t: &LoraTarget| format!("{}.lora_a", t.tensor_stem(0));
        let targets: Vec<LoraTarget> = LoraTarget::ATTENTION
            .into_iter()
            .filter(|t| tensors.contains_key(&first_a(t)))
            .collect();
        let lora_rank = match targets.first() {
            Some(t) => tensors[&first_a(t)].dim(1)?,
            None => return Err(adapter_error(pt, AdapterProblem::NoLayer0Lora)),
        };
        let ratio = match settings.ratio {
            Some(r) => r,
            None => (1..=settings.chunk_size)
                .find(|&r| chunk::mem_size(settings.chunk_size, r) == mem_size)
                .ok_or_else(|| Error::UnknownRatio {
                    path: pt.to_path_buf(),
                    mem_size,
                    chunk_size: settings.chunk_size,
                })?,
        };
        let config = AdapterConfig {
            method: SAC.name.into(),
            ratio,
            chunk_size: settings.chunk_size,
            mem_size,
            lora_rank,
            lora_scale: settings.lora_scale,
            lora_targets: LoraTarget::names(&targets),
            base_model: settings.base_model,
            base_model_fingerprint: settings.base_model_fingerprint,
        };
        Self::from_tensors(config, tensors, model, DType::F32).map_err(|e| adapter_error(pt, e))
    }
}

/// What a reference `.pt` file does not say about itself.
#[derive(Debug, Clone)]
pub struct ImportSettings {
    pub chunk_size: usize,
    /// Derived from the number of role embeddings when `None`.
    pub ratio: Option<usize>,
    pub lora_scale: f64,
    pub base_model: String,
    pub base_model_fingerprint: Option<String>,
}

/// `model.model.layers.3.self_attn.q_proj.lora_A` -> `layers.3.self_attn.q_proj.lora_a`.
fn reference_lora_name(name: &str) -> Option<String> {
    let rest = &name[name.find("layers.")?..];
    let (stem, which) = rest.rsplit_once('.')?;
    let which = match which {
        "lora_A" => "lora_a",
        "lora_B" => "lora_b",
        _ => return None,
    };
    let mut parts = stem.split('.');
    let ok = parts.next() == Some("layers")
        && parts.next().is_some_and(|i| i.parse::<usize>().is_ok())
        && parts.next() == Some("self_attn")
        && parts
            .next()
            .is_some_and(|p| LoraTarget::from_name(p).is_some_and(LoraTarget::is_attention))
        && parts.next().is_none();
    ok.then(|| format!("{stem}.{which}"))
}

pub(super) fn validate_config(c: &AdapterConfig) -> std::result::Result<(), AdapterProblem> {
    if c.method != SAC.name {
        return Err(AdapterProblem::Method {
            found: c.method.clone(),
            expected: SAC.name,
        });
    }
    if c.ratio == 0 || c.chunk_size == 0 || c.lora_rank == 0 {
        return Err(AdapterProblem::NotPositive(
            "ratio, chunk_size and lora_rank",
        ));
    }
    let needed = chunk::mem_size(c.chunk_size, c.ratio);
    if c.mem_size < needed {
        return Err(AdapterProblem::TooFewAnchors {
            mem_size: c.mem_size,
            needed,
            chunk_size: c.chunk_size,
            ratio: c.ratio,
        });
    }
    if let Some(t) = c
        .lora_targets
        .iter()
        .find(|t| LoraTarget::from_name(t).is_none_or(|t| !t.is_attention()))
    {
        return Err(AdapterProblem::UnknownTarget {
            name: t.clone(),
            known: LoraTarget::names(&LoraTarget::ATTENTION),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_names_map_to_ours() {
        assert_eq!(
            reference_lora_name("model.model.layers.3.self_attn.q_proj.lora_A").as_deref(),
            Some("layers.3.self_attn.q_proj.lora_a")
        );
        assert_eq!(
            reference_lora_name("base_model.model.model.layers.0.self_attn.v_proj.lora_B")
                .as_deref(),
            Some("layers.0.self_attn.v_proj.lora_b")
        );
        assert_eq!(
            reference_lora_name("model.model.layers.0.self_attn.k_proj.lora_A").as_deref(),
            Some("layers.0.self_attn.k_proj.lora_a")
        );
        assert_eq!(
            reference_lora_name("model.model.layers.0.self_attn.rotary_emb.lora_A"),
            None
        );
        assert_eq!(
            reference_lora_name("model.model.layers.x.self_attn.q_proj.lora_A"),
            None
        );
        assert_eq!(reference_lora_name("role_tokens"), None);
    }

    fn config(base_model: &str) -> AdapterConfig {
        AdapterConfig {
            method: SAC.name.into(),
            ratio: 5,
            chunk_size: 510,
            mem_size: 102,
            lora_rank: 128,
            lora_scale: 2.0,
            lora_targets: vec!["q_proj".into(), "v_proj".into()],
            base_model: base_model.into(),
            base_model_fingerprint: None,
        }
    }

    #[test]
    fn a_relative_base_model_is_found_beside_the_adapter() {
        let root = tempfile::tempdir().unwrap();
        let adapter = root.path().join("adapter");
        std::fs::create_dir_all(root.path().join("model")).unwrap();
        std::fs::create_dir_all(&adapter).unwrap();
        let beside = config("../model").base_model_from(&adapter);
        assert!(Path::new(&beside).is_dir(), "{beside}");
        assert!(beside.starts_with(&*adapter.to_string_lossy()));
        // A GGUF file beside the adapter, likewise.
        std::fs::write(root.path().join("model.gguf"), b"GGUF").unwrap();
        let file = config("../model.gguf").base_model_from(&adapter);
        assert!(Path::new(&file).is_file(), "{file}");
        assert!(file.starts_with(&*adapter.to_string_lossy()));
        // Not a directory beside the adapter: a Hub id (or a path relative
        // to where sac runs), kept as written.
        assert_eq!(config("owner/name").base_model_from(&adapter), "owner/name");
        let absolute = root.path().join("model").to_string_lossy().into_owned();
        assert_eq!(config(&absolute).base_model_from(&adapter), absolute);
    }

    #[test]
    fn only_another_named_model_is_a_mismatch() {
        let dir = Path::new("ad");
        let mut c = config("m");
        // A config that names no fingerprint (written by hand, say): nothing
        // to hold against it.
        assert_eq!(c.model_mismatch(dir, "m", "sha256:a"), None);
        c.base_model_fingerprint = Some("sha256:a".into());
        assert_eq!(c.model_mismatch(dir, "m", "sha256:a"), None);
        assert_eq!(
            c.model_mismatch(dir, "m2", "sha256:b")
                .map(|m| m.to_string())
                .as_deref(),
            Some("ad was trained on model m (sha256:a), but the model given is m2 (sha256:b)")
        );
    }

    #[test]
    fn config_must_cover_a_full_chunk() {
        let mut c = config("m");
        assert!(validate_config(&c).is_ok());
        c.mem_size = 101;
        assert!(
            validate_config(&c)
                .unwrap_err()
                .to_string()
                .contains("fewer")
        );
        c.mem_size = 102;
        c.lora_targets.push("k_proj".into());
        assert!(validate_config(&c).is_ok());
        c.lora_targets.push("up_proj".into());
        assert!(
            validate_config(&c)
                .unwrap_err()
                .to_string()
                .contains("up_proj")
        );
    }
}
