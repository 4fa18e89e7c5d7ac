//! The trainable tensors of an adapter as f32 `Var`s, whatever dtype the
//! frozen base model runs in; the forward pass sees them through a cast to
//! the model's dtype, which gradients flow back through. SAC's: role
//! embeddings, `[AE]`/`[LM]`, LoRA A/B. GMSA's: the encoder's LoRA A/B and
//! the alignment block's weights, then (stage 2) the decoder's LoRA A/B
//! with those frozen: a run trains the tensors its stage trains, and keeps
//! the rest as plain tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand_distr::{Distribution, Normal, Uniform};

use crate::adapter::gmsa::DECODER_PREFIX;
use crate::adapter::{self, AdapterError, Config, GmsaAdapter, Loaded, SacAdapter};
use crate::error::{Error, InputError, Result};
use crate::model::{Decoder, LoraTarget, ModelConfig};

use super::{Stream, rng};

/// Standard deviation of the role embeddings at initialisation (the paper's).
const ROLE_STD: f64 = 0.02;

/// An adapter's tensors as variables, in a fixed order (sorted by name) that
/// the optimizer and checkpoints rely on.
#[derive(Debug)]
pub struct Trainables {
    config: Config,
    vars: Vec<(String, Var)>,
    /// The adapter's tensors this run does not train.
    frozen: HashMap<String, Tensor>,
}

impl Trainables {
    /// A fresh adapter. LoRA A is Kaiming-uniform (PyTorch's default for a
    /// linear layer, and PEFT's: U(±1/sqrt(in))) and B zero, so the
    /// compressor starts as the base model. SAC's role embeddings are drawn
    /// from N(0, 0.02) and `[AE]`/`[LM]` from N(mean, std) of the model's
    /// token embeddings, as the reference does, so `[LM]` starts at the scale
    /// of a real token. GMSA's alignment block starts as a copy of the
    /// model's first layers, as the official code's does.
    pub fn init(config: Config, decoder: &Decoder, seed: u64) -> Result<Self> {
        let tensors = fresh_tensors(&config, decoder, seed, |_| true)?;
        Self::from_tensors(config, tensors, decoder.config(), decoder.device(), |_| {
            true
        })
    }

    /// Variables holding the tensors (named as in `adapter.safetensors`)
    /// that `trains` names, the others kept frozen, after checking them all
    /// against the model.
    pub fn from_tensors(
        config: Config,
        tensors: HashMap<String, Tensor>,
        model: &ModelConfig,
        device: &Device,
        trains: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        build(&config, tensors.clone(), model, DType::F32)?;
        let mut vars = Vec::new();
        let mut frozen = HashMap::new();
        for (name, t) in tensors {
            let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
            if trains(&name) {
                vars.push((name, Var::from_tensor(&t)?));
            } else {
                frozen.insert(name, t);
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Trainables {
            config,
            vars,
            frozen,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `(name, variable)` in the fixed order.
    pub fn named(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn vars(&self) -> Vec<&Var> {
        self.vars.iter().map(|(_, v)| v).collect()
    }

    /// The adapter as the compressor and decoder use it, in `dtype`, with
    /// the graph back to the variables kept.
    pub fn adapter(&self, model: &ModelConfig, dtype: DType) -> Result<Loaded> {
        let tensors = self.tensors(|v| v.as_tensor().clone());
        build(&self.config, tensors, model, dtype)
    }

    /// The current values as an adapter with no graph, for evaluation.
    pub fn snapshot(&self, model: &ModelConfig, dtype: DType) -> Result<Loaded> {
        build(
            &self.config,
            self.tensors(Var::as_detached_tensor),
            model,
            dtype,
        )
    }

    /// Writes the adapter directory with the current values.
    pub fn save(&self, dir: &Path) -> Result<()> {
        adapter::save(dir, &self.config, self.tensors(Var::as_detached_tensor))
    }

    /// Every tensor of the adapter, the variables' as `tensor` gives them.
    fn tensors(&self, tensor: impl Fn(&Var) -> Tensor) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), tensor(v)))
            .chain(self.frozen.iter().map(|(n, t)| (n.clone(), t.clone())))
            .collect()
    }
}

/// The adapter `config` describes, from `tensors`, checked against `model`.
fn build(
    config: &Config,
    tensors: HashMap<String, Tensor>,
    model: &ModelConfig,
    dtype: DType,
) -> Result<Loaded> {
    Ok(match config {
        Config::Sac(c) => Loaded::Sac(
            SacAdapter::from_tensors(c.clone(), tensors, model, dtype)
                .map_err(AdapterError::Invalid)?,
        ),
        Config::Gmsa(c) => Loaded::Gmsa(
            GmsaAdapter::from_tensors(c.clone(), tensors, model, dtype)
                .map_err(AdapterError::Invalid)?,
        ),
    })
}

/// A fresh adapter's tensors (see [`Trainables::init`]), those `wanted`
/// names only. Each tensor draws from its own stream, numbered by its place
/// among all of the adapter's, so a tensor is the same whichever others are
/// wanted.
pub fn fresh_tensors(
    config: &Config,
    decoder: &Decoder,
    seed: u64,
    wanted: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let model = decoder.config();
    let h = model.hidden_size;
    let mut shapes: Vec<(String, Vec<usize>, Init)> = Vec::new();
    // LoRA groups: (tensor prefix, layers, targets, rank).
    let mut loras = Vec::new();
    match config {
        Config::Sac(c) => {
            shapes.push((
                "role_tokens".into(),
                vec![c.mem_size, h],
                Init::Normal(0.0, ROLE_STD),
            ));
            shapes.push(("special_tokens".into(), vec![2, h], Init::LikeTokens));
            loras.push(("", model.num_layers, c.targets(), c.lora_rank));
        }
        Config::Gmsa(c) => {
            for layer in 0..c.lsa_layers {
                for (name, tensor) in decoder.layer_tensors(layer)? {
                    let name = format!("lsa.layers.{layer}.{name}");
                    shapes.push((name, tensor.dims().to_vec(), Init::Copy(tensor)));
                }
            }
            let targets = LoraTarget::from_names(&c.lora_targets);
            loras.push(("encoder.", c.encoder_layers, targets, c.lora_rank));
            if let Some(d) = &c.decoder_lora {
                let targets = LoraTarget::from_names(&d.targets);
                loras.push((DECODER_PREFIX, model.num_layers, targets, d.rank));
            }
        }
    }
    for (prefix, layers, targets, rank) in loras {
        for i in 0..layers {
            for &target in &targets {
                let (inputs, outputs) = target.features(model);
                let bound = 1.0 / (inputs as f64).sqrt();
                let p = format!("{prefix}{}", target.tensor_stem(i));
                shapes.push((
                    format!("{p}.lora_a"),
                    vec![inputs, rank],
                    Init::Uniform(bound),
                ));
                shapes.push((format!("{p}.lora_b"), vec![rank, outputs], Init::Zeros));
            }
        }
    }
    shapes.sort_by(|a, b| a.0.cmp(&b.0));
    let device = decoder.device();
    let mut tensors = HashMap::new();
    for (index, (name, shape, init)) in shapes.into_iter().enumerate() {
        if !wanted(&name) {
            continue;
        }
        let n = shape.iter().product();
        let mut r = rng(seed, Stream::Init, index as u64);
        let mut normal = |mean, std| -> Result<Vec<f32>> {
            let d = Normal::new(mean, std).map_err(|e| init_error(&name, e))?;
            Ok((0..n).map(|_| d.sample(&mut r) as f32).collect())
        };
        let values: Vec<f32> = match init {
            Init::Normal(mean, std) => normal(mean, std)?,
            Init::LikeTokens => {
                let (mean, std) = embedding_stats(decoder)?;
                normal(mean, std)?
            }
            Init::Uniform(bound) => {
                let d = Uniform::new(-bound, bound).map_err(|e| init_error(&name, e))?;
                (0..n).map(|_| d.sample(&mut r) as f32).collect()
            }
            Init::Zeros => vec![0.0; n],
            Init::Copy(tensor) => {
                tensors.insert(name, tensor.to_dtype(DType::F32)?);
                continue;
            }
        };
        tensors.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(tensors)
}

enum Init {
    Normal(f64, f64),
    /// N(mean, std) of the model's token embeddings (read only if drawn).
    LikeTokens,
    Uniform(f64),
    Zeros,
    Copy(Tensor),
}

/// Mean and (unbiased) standard deviation of the token embedding table,
/// read a slice of the vocabulary at a time to bound memory.
fn embedding_stats(decoder: &Decoder) -> Result<(f64, f64)> {
    const SLICE: u32 = 4096;
    let vocab = decoder.config().vocab_size as u32;
    let (mut sum, mut squares) = (0.0f64, 0.0f64);
    let mut start = 0u32;
    while start < vocab {
        let end = (start + SLICE).min(vocab);
        let ids = Tensor::arange(start, end, decoder.device())?.unsqueeze(0)?;
        let rows = decoder.embed(&ids)?.to_dtype(DType::F64)?;
        sum += rows.sum_all()?.to_scalar::<f64>()?;
        squares += rows.sqr()?.sum_all()?.to_scalar::<f64>()?;
        start = end;
    }
    let n = (vocab as usize * decoder.config().hidden_size) as f64;
    let mean = sum / n;
    let variance = ((squares - n * mean * mean) / (n - 1.0)).max(0.0);
    Ok((mean, variance.sqrt()))
}

fn init_error(name: &str, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    InputError::Init {
        name: name.to_string(),
        source: Box::new(source),
    }
    .into()
}
