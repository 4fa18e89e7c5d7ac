//! Adapters: the trained parts of a compressor, stored as a directory with
//! `adapter.safetensors` and `adapter_config.json`, whose `method` says whose
//! they are ([`Config`], [`Loaded`]): SAC's in [`sac`], GMSA's in [`gmsa`].
//! What they share (reading, errors, the model they were trained on, the
//! fingerprint) is here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::compress::Trained;
use crate::compress::gmsa::METHOD as GMSA;
use crate::compress::sac::METHOD as SAC;
use crate::error::{Error, Result};
use crate::fingerprint::{DigestCache, manifest_digest};
use crate::model::{LayerLora, LoraTarget, LowRank, ModelConfig};

pub mod gmsa;
pub mod sac;

pub use gmsa::{GmsaAdapter, GmsaConfig};
pub use sac::{AdapterConfig, ImportSettings, SacAdapter};

use sac::validate_config;

pub const WEIGHTS_FILE: &str = "adapter.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// What an adapter's config says of the model it was trained on.
pub trait TrainedOn {
    /// A Hub id, or a model directory or GGUF file, absolute or relative to
    /// the adapter's own directory.
    fn base_model(&self) -> &str;

    fn base_model_fingerprint(&self) -> Option<&str>;

    /// Why this adapter, read from `dir`, does not go with the model `id`
    /// whose fingerprint is `fingerprint`, if it names another one: its
    /// weights were fitted to that model's.
    fn model_mismatch(&self, dir: &Path, id: &str, fingerprint: &str) -> Option<ModelMismatch> {
        self.base_model_fingerprint()
            .filter(|fp| *fp != fingerprint)
            .map(|fp| ModelMismatch {
                dir: dir.to_path_buf(),
                trained_on: self.base_model().to_string(),
                trained_fingerprint: fp.to_string(),
                given: id.to_string(),
                given_fingerprint: fingerprint.to_string(),
            })
    }

    /// [`TrainedOn::base_model`] for `--model`, with a relative model
    /// directory or GGUF file taken from `dir`, the adapter's directory, when
    /// it is there. Anything else (a Hub id, an absolute path) is returned as
    /// it is.
    fn base_model_from(&self, dir: &Path) -> String {
        let path = Path::new(self.base_model());
        let beside = dir.join(path);
        if path.is_relative() && beside.exists() {
            beside.to_string_lossy().into_owned()
        } else {
            self.base_model().to_string()
        }
    }
}

/// An adapter directory's config, for whichever method it was trained
/// (written as the method's own config).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Config {
    Sac(AdapterConfig),
    Gmsa(GmsaConfig),
}

impl Config {
    /// Reads `adapter_config.json` in `dir` as the config of the method it
    /// names.
    pub fn load(dir: &Path) -> Result<Self> {
        let (path, text) = read_config(dir)?;
        Self::parse(&path, &text)
    }

    /// `text`, the config at `path` (a file, or a checkpoint holding one),
    /// read as the config of the method it names.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let method = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|json| Some(json.get("method")?.as_str()?.to_string()));
        if method.as_deref() == Some(GMSA.name) {
            Ok(Config::Gmsa(parse_config(
                path,
                text,
                GmsaConfig::validate,
            )?))
        } else {
            Ok(Config::Sac(parse_config(path, text, validate_config)?))
        }
    }

    /// The method, ratio and chunk size the adapter was trained for.
    pub fn trained(&self) -> Trained {
        match self {
            Config::Sac(c) => Trained {
                method: &SAC,
                ratio: c.ratio,
                chunk_size: Some(c.chunk_size),
            },
            Config::Gmsa(c) => Trained {
                method: &GMSA,
                ratio: c.merge_size,
                chunk_size: None,
            },
        }
    }

    pub fn trained_on(&self) -> &dyn TrainedOn {
        match self {
            Config::Sac(c) => c,
            Config::Gmsa(c) => c,
        }
    }
}

/// A loaded adapter of either kind, on the model's device and in its dtype.
#[derive(Debug, Clone)]
pub enum Loaded {
    Sac(SacAdapter),
    Gmsa(GmsaAdapter),
}

impl Loaded {
    /// The adapter in `dir`, whose config is `config`.
    pub fn load(
        config: &Config,
        dir: &Path,
        model: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(match config {
            Config::Sac(_) => Loaded::Sac(SacAdapter::load(dir, model, device, dtype)?),
            Config::Gmsa(_) => Loaded::Gmsa(GmsaAdapter::load(dir, model, device, dtype)?),
        })
    }
}

/// An adapter that cannot be read, or does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {}", path.display())]
    At {
        path: PathBuf,
        #[source]
        problem: AdapterProblem,
    },
    /// Tensors made in memory (a training run's) that do not form an adapter.
    #[error("adapter")]
    Invalid(#[source] AdapterProblem),
    #[error("adapter {0}")]
    OtherModel(Box<ModelMismatch>),
}

/// What is wrong with an adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterProblem {
    #[error("not an adapter config")]
    NotConfig(#[source] serde_json::Error),
    #[error("method `{found}` is not `{expected}`")]
    Method {
        found: String,
        expected: &'static str,
    },
    #[error("{what} {count} is not in 1..={most}")]
    Layers {
        what: &'static str,
        count: usize,
        most: usize,
    },
    #[error("{0} must be positive")]
    NotPositive(&'static str),
    #[error(
        "mem_size {mem_size} is fewer than the {needed} anchors of a {chunk_size}-token chunk at \
         ratio {ratio}"
    )]
    TooFewAnchors {
        mem_size: usize,
        needed: usize,
        chunk_size: usize,
        ratio: usize,
    },
    #[error("LoRA target `{name}` is not supported (only {})", known.join(", "))]
    UnknownTarget { name: String, known: Vec<String> },
    #[error("has no `{WEIGHTS_FILE}`")]
    NoWeights,
    #[error("unreadable weights")]
    Unreadable(#[source] candle_core::Error),
    #[error(
        "was made for a model of hidden size {width} ({base_model}), and this one's is {hidden}"
    )]
    HiddenSize {
        width: usize,
        base_model: String,
        hidden: usize,
    },
    #[error("no tensor `{0}`")]
    NoTensor(String),
    #[error("`{name}` has shape {shape:?}, expected {expected:?}")]
    Shape {
        name: String,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("`{name}` cannot be cast")]
    Cast {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("unexpected tensor `{0}` (is it for another model?)")]
    Extra(String),
    #[error("not a PyTorch state dict")]
    NotStateDict(#[source] candle_core::Error),
    #[error("unexpected tensor `{0}`")]
    Unexpected(String),
    #[error("two tensors map to `{ours}` (last: `{name}`)")]
    TwoMapTo { ours: String, name: String },
    #[error("no `role_tokens`")]
    NoRoleTokens,
    #[error("no LoRA on layer 0")]
    NoLayer0Lora,
    #[error("its alignment block does not load")]
    Lsa(#[source] Box<Error>),
    #[error("holds {found} alignment-block tensors, and the block has {expected}")]
    LsaTensors { found: usize, expected: usize },
}

/// An adapter trained on another model than the one given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} was trained on model {trained_on} ({trained_fingerprint}), but the model given is {given} \
     ({given_fingerprint})",
    dir.display()
)]
pub struct ModelMismatch {
    pub dir: PathBuf,
    pub trained_on: String,
    pub trained_fingerprint: String,
    pub given: String,
    pub given_fingerprint: String,
}

/// Writes an adapter directory: `tensors` (in f32) and `config`, each file
/// atomically.
pub fn save(
    dir: &Path,
    config: &impl serde::Serialize,
    tensors: HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io("cannot create adapter directory", dir, e))?;
    let serialize = |e: Box<dyn std::error::Error + Send + Sync>| Error::Serialize {
        what: dir.display().to_string(),
        source: e,
    };
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let weights = safetensors::serialize(tensors, None).map_err(|e| serialize(e.into()))?;
    crate::atomic::write_bytes(&dir.join(WEIGHTS_FILE), &weights)?;
    let mut json = serde_json::to_string_pretty(config).map_err(|e| serialize(e.into()))?;
    json.push('\n');
    crate::atomic::write_bytes(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// The path and text of `adapter_config.json` in `dir`.
fn read_config(dir: &Path) -> Result<(PathBuf, String)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io("cannot read adapter config", &path, e))?;
    Ok((path, text))
}

/// `text`, the config at `path`, parsed and checked by `validate`.
fn parse_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    validate: impl Fn(&T) -> std::result::Result<(), AdapterProblem>,
) -> Result<T> {
    let config: T = serde_json::from_str(text)
        .map_err(|e| adapter_error(path, AdapterProblem::NotConfig(e)))?;
    validate(&config).map_err(|e| adapter_error(path, e))?;
    Ok(config)
}

/// The tensors of `adapter.safetensors` in `dir`, and its path.
pub(crate) fn read_weights(
    dir: &Path,
    device: &Device,
) -> Result<(PathBuf, HashMap<String, Tensor>)> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(adapter_error(dir, AdapterProblem::NoWeights));
    }
    let tensors = candle_core::safetensors::load(&path, device)
        .map_err(|e| adapter_error(&path, AdapterProblem::Unreadable(e)))?;
    Ok((path, tensors))
}

/// Tensor `name` of `tensors`, removed, checked to have `shape`, cast to
/// `dtype`.
fn take(
    tensors: &mut HashMap<String, Tensor>,
    name: String,
    shape: &[usize],
    dtype: DType,
) -> std::result::Result<Tensor, AdapterProblem> {
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
}

/// The LoRA of `layers` layers of `model` on `targets`, taken from
/// `tensors` named `{prefix}layers.{i}.{block}.{proj}.lora_{a|b}`.
fn lora_layers(
    tensors: &mut HashMap<String, Tensor>,
    prefix: &str,
    layers: usize,
    targets: &[LoraTarget],
    (rank, scale): (usize, f64),
    model: &ModelConfig,
    dtype: DType,
) -> std::result::Result<Vec<LayerLora>, AdapterProblem> {
    (0..layers)
        .map(|i| {
            LayerLora::try_from_fn(|target| {
                if !targets.contains(&target) {
                    return Ok(None);
                }
                let (inputs, outputs) = target.features(model);
                let stem = format!("{prefix}{}", target.tensor_stem(i));
                Ok(Some(LowRank {
                    a: take(tensors, format!("{stem}.lora_a"), &[inputs, rank], dtype)?,
                    b: take(tensors, format!("{stem}.lora_b"), &[rank, outputs], dtype)?,
                    scale,
                }))
            })
        })
        .collect()
}

pub(crate) fn adapter_error(path: &Path, problem: AdapterProblem) -> Error {
    AdapterError::At {
        path: path.to_path_buf(),
        problem,
    }
    .into()
}

/// The adapter's fingerprint: its weights and config, hashed as model files are.
pub fn fingerprint(dir: &Path, cache: &mut DigestCache) -> Result<String> {
    let files: [(&str, PathBuf); 2] = [
        ("adapter", dir.join(WEIGHTS_FILE)),
        ("adapter_config", dir.join(CONFIG_FILE)),
    ];
    let files: Vec<(&str, &Path)> = files.iter().map(|(r, p)| (*r, p.as_path())).collect();
    let digest = manifest_digest("sac-adapter-v1", &files, cache)?;
    cache.save();
    Ok(digest)
}
