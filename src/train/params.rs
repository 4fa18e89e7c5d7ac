//! The trainable tensors of a SAC adapter (role embeddings, `[AE]`/`[LM]`,
//! LoRA A/B) as f32 `Var`s, whatever dtype the frozen base model runs
//! in; the forward pass sees them through a cast to the model's dtype, which
//! gradients flow back through.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand_distr::{Distribution, Normal, Uniform};

use crate::adapter::{AdapterConfig, AdapterError, SacAdapter};
use crate::error::{Error, InputError, Result};
use crate::model::{Decoder, ModelConfig};

use super::{Stream, rng};

/// Standard deviation of the role embeddings at initialisation (the paper's).
const ROLE_STD: f64 = 0.02;

/// An adapter's tensors as variables, in a fixed order (sorted by name) that
/// the optimizer and checkpoints rely on.
#[derive(Debug)]
pub struct Trainables {
    config: AdapterConfig,
    vars: Vec<(String, Var)>,
}

impl Trainables {
    /// A fresh adapter: role embeddings N(0, 0.02); `[AE]`/`[LM]` drawn from
    /// N(mean, std) of the model's token embeddings, as the reference does,
    /// so `[LM]` starts at the scale of a real token; LoRA A Kaiming-uniform
    /// (PyTorch's default for a linear layer: U(±1/sqrt(in))) and B zero, so
    /// the compressor starts as the base model.
    pub fn init(config: AdapterConfig, decoder: &Decoder, seed: u64) -> Result<Self> {
        let model = decoder.config();
        let device = decoder.device();
        let h = model.hidden_size;
        let rank = config.lora_rank;
        let (mean, std) = embedding_stats(decoder)?;
        let mut shapes: Vec<(String, Vec<usize>, Init)> = vec![
            (
                "role_tokens".into(),
                vec![config.mem_size, h],
                Init::Normal(0.0, ROLE_STD),
            ),
            ("special_tokens".into(), vec![2, h], Init::Normal(mean, std)),
        ];
        for i in 0..model.num_layers {
            for target in config.targets() {
                let (inputs, outputs) = target.features(model);
                let bound = 1.0 / (inputs as f64).sqrt();
                let p = target.tensor_stem(i);
                shapes.push((
                    format!("{p}.lora_a"),
                    vec![inputs, rank],
                    Init::Uniform(bound),
                ));
                shapes.push((format!("{p}.lora_b"), vec![rank, outputs], Init::Zeros));
            }
        }
        shapes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors = HashMap::new();
        for (index, (name, shape, init)) in shapes.into_iter().enumerate() {
            let n = shape.iter().product();
            let mut r = rng(seed, Stream::Init, index as u64);
            let values: Vec<f32> = match init {
                Init::Normal(mean, std) => {
                    let d = Normal::new(mean, std).map_err(|e| init_error(&name, e))?;
                    (0..n).map(|_| d.sample(&mut r) as f32).collect()
                }
                Init::Uniform(bound) => {
                    let d = Uniform::new(-bound, bound).map_err(|e| init_error(&name, e))?;
                    (0..n).map(|_| d.sample(&mut r) as f32).collect()
                }
                Init::Zeros => vec![0.0; n],
            };
            tensors.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Self::from_tensors(config, tensors, model, device)
    }

    /// Variables holding `tensors` (named as in `adapter.safetensors`), after
    /// checking them against the model.
    pub fn from_tensors(
        config: AdapterConfig,
        tensors: HashMap<String, Tensor>,
        model: &ModelConfig,
        device: &Device,
    ) -> Result<Self> {
        let adapter = SacAdapter::from_tensors(config.clone(), tensors, model, DType::F32)
            .map_err(AdapterError::Invalid)?;
        let mut vars = adapter
            .tensors()?
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t.to_device(device)?.contiguous()?)?)))
            .collect::<Result<Vec<_>>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Trainables { config, vars })
    }

    pub fn config(&self) -> &AdapterConfig {
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
    pub fn adapter(&self, model: &ModelConfig, dtype: DType) -> Result<SacAdapter> {
        self.build(model, dtype, |v| v.as_tensor().clone())
    }

    /// The current values as an adapter with no graph: for evaluation and saving.
    pub fn snapshot(&self, model: &ModelConfig, dtype: DType) -> Result<SacAdapter> {
        self.build(model, dtype, Var::as_detached_tensor)
    }

    fn build(
        &self,
        model: &ModelConfig,
        dtype: DType,
        tensor: impl Fn(&Var) -> Tensor,
    ) -> Result<SacAdapter> {
        let tensors = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), tensor(v)))
            .collect();
        Ok(
            SacAdapter::from_tensors(self.config.clone(), tensors, model, dtype)
                .map_err(AdapterError::Invalid)?,
        )
    }
}

enum Init {
    Normal(f64, f64),
    Uniform(f64),
    Zeros,
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
