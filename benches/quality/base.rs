//! Step 2 of the quality benchmark: a tiny Llama trained from random weights,
//! every parameter, on the task with the whole document in view, so that the
//! task is solvable before anything is compressed.
//!
//! Each step reads one training document followed by its questions and
//! answers in the prompt layout `sac ask` uses. The loss is the mean
//! next-token loss over the document (the names recur in it, which teaches
//! the model to look back) plus the mean loss over the answers and their EOS.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use sac::model::{
    AttentionMask, Decoder, ForwardInput, ModelConfig, ModelFiles, Path as ForwardPath,
};
use sac::tokens::TextTokenizer;
use serde_json::{Value, json};

use crate::data::Example;

/// The tiny model's shape (its vocabulary comes from the tokenizer).
pub fn config() -> Value {
    json!({
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": true
    })
}

pub struct BaseSettings {
    pub steps: usize,
    pub lr: f64,
    pub seed: u64,
    pub device: Device,
}

/// Token ids of one training sequence and, per predicted position, its
/// target and its weight in the loss.
fn sequence(tokenizer: &TextTokenizer, doc: &[Example]) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
    let mut ids = tokenizer.context_ids(&doc[0].context)?;
    let context = ids.len() - 1;
    let mut weights = vec![1.0 / context as f32; context];
    let eos = *tokenizer
        .eos()
        .first()
        .context("the tokenizer has no EOS")?;
    let answers: Vec<Vec<u32>> = doc
        .iter()
        .map(|e| {
            let mut a = tokenizer.encode(&e.answer)?;
            a.push(eos);
            Ok(a)
        })
        .collect::<anyhow::Result<_>>()?;
    let answer_tokens: usize = answers.iter().map(Vec::len).sum();
    for (example, answer) in doc.iter().zip(answers) {
        let question = tokenizer.question_ids(&example.question)?;
        weights.extend(std::iter::repeat_n(0.0, question.len()));
        weights.extend(std::iter::repeat_n(
            1.0 / answer_tokens as f32,
            answer.len(),
        ));
        ids.extend(question);
        ids.extend(answer);
    }
    Ok((ids, weights))
}

/// Fills every weight with N(0, 0.02) noise, norms with ones, from `seed`.
fn randomize(varmap: &VarMap, seed: u64) -> anyhow::Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02)?;
    for name in names {
        let var = &data[name];
        let init = if name.ends_with("norm.weight") {
            Tensor::ones(var.shape(), DType::F32, var.device())?
        } else {
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| normal.sample(&mut rng))
                .collect();
            Tensor::from_vec(values, var.shape(), var.device())?
        };
        var.set(&init)?;
    }
    Ok(())
}

/// Trains the model in `dir` (config.json, tokenizer) on `train` and writes
/// its weights to `dir/model.safetensors`.
pub fn train(dir: &Path, train: &[Example], settings: &BaseSettings) -> anyhow::Result<()> {
    let files = ModelFiles {
        id: dir.display().to_string(),
        revision: None,
        config: dir.join("config.json"),
        tokenizer: dir.join("tokenizer.json"),
        tokenizer_config: dir.join("tokenizer_config.json"),
        generation_config: None,
        weights: Vec::new(),
    };
    let config = ModelConfig::from_file(&files.config)?;
    let tokenizer = TextTokenizer::load(&files, &config)?;
    let device = &settings.device;
    let varmap = VarMap::new();
    let decoder = Decoder::load(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    randomize(&varmap, settings.seed)?;
    let mut optimizer = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: settings.lr,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let documents: Vec<&[Example]> = train.chunk_by(|a, b| a.context == b.context).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed + 1);
    let mut order: Vec<usize> = Vec::new();
    let warmup = (settings.steps / 20).max(1);
    let started = Instant::now();
    let mut recent = Vec::new();
    for step in 0..settings.steps {
        if order.is_empty() {
            order = (0..documents.len()).collect();
            order.shuffle(&mut rng);
        }
        let doc = documents[order.pop().context("no training documents")?];
        let (ids, weights) = sequence(&tokenizer, doc)?;
        let n = ids.len() - 1;
        let inputs = Tensor::new(&ids[..n], device)?.unsqueeze(0)?;
        let targets = Tensor::new(&ids[1..], device)?;
        let positions = Tensor::arange(1u32, n as u32 + 1, device)?.unsqueeze(0)?;
        let out = decoder.forward(ForwardInput {
            embeds: &decoder.embed(&inputs)?,
            positions: &positions,
            mask: AttentionMask::Causal,
            shared: None,
            past: None,
            lora: None,
            path: ForwardPath::Training,
        })?;
        let logits = decoder.logits(&out.hidden)?.squeeze(0)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        let loss = (picked * Tensor::new(weights.as_slice(), device)?)?
            .sum_all()?
            .neg()?;
        let progress = step as f64 / settings.steps as f64;
        let lr = if step < warmup {
            settings.lr * (step + 1) as f64 / warmup as f64
        } else {
            settings.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        };
        optimizer.set_learning_rate(lr);
        optimizer.backward_step(&loss)?;
        recent.push(loss.to_scalar::<f32>()?);
        if (step + 1) % 50 == 0 {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            recent.clear();
            eprintln!(
                "base model: step {} / {}, loss {mean:.3}, {:.0} s",
                step + 1,
                settings.steps,
                started.elapsed().as_secs_f64()
            );
        }
    }
    varmap.save(dir.join("model.safetensors"))?;
    Ok(())
}
