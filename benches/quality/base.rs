//! Step 2 of the quality benchmark: a tiny Llama trained from random weights,
//! every parameter, on the task with the whole document in view, so that the
//! task is solvable before anything is compressed.
//!
//! Each step reads fresh documents about training names, each followed by
//! its questions and answers in the prompt layout `sac ask` uses (see
//! [`Sequence`]), on a curriculum of growing documents. The loss weighs the
//! document's next-token loss by [`DOCUMENT_WEIGHT`] beside the answers'
//! (with their EOS).

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use sac::model::{
    AttentionMask, Decoder, ForwardInput, ModelConfig, ModelFiles, Path as ForwardPath, mask,
};
use sac::tokens::TextTokenizer;
use serde_json::{Value, json};

use crate::data::{Example, PEOPLE, document};

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
    /// Training tokens per optimizer step (whole documents, at least one).
    pub tokens_per_step: usize,
    pub seed: u64,
    pub device: Device,
}

/// Questions asked after each training document: many per document, so
/// that most of a sequence's loss is on looking facts up.
const TRAINING_QUESTIONS: usize = 16;

/// How many people training documents are about, level by level: short
/// documents first, where the answer is among few facts and the attention
/// has few places to look, growing to the test documents' size.
const LEVELS: [RangeInclusive<usize>; 7] = [1..=2, 2..=4, 3..=8, 5..=14, 8..=24, 12..=36, PEOPLE];

/// The answer accuracy (first tokens, over one logging window) at which
/// training moves on to the next level.
const LEVEL_UP_ACCURACY: f64 = 0.9;

/// The document's share of the loss beside the answers' one: its repeated
/// names teach the model to look back, but most of it (which value a fact
/// has) cannot be predicted and would drown the answers.
const DOCUMENT_WEIGHT: f32 = 0.25;

/// One training sequence: a document, then its questions each followed by
/// its answer and EOS. Every question sees the document and itself only, at
/// the positions right after the document, as if asked alone: packing them
/// costs one pass over the document, and no question can copy an earlier
/// answer.
struct Sequence {
    ids: Vec<u32>,
    /// Per token, its position id.
    positions: Vec<u32>,
    /// Per token, 0 in the document and k for the k-th question's block.
    blocks: Vec<u32>,
    /// Per predicted position (`ids[i + 1]` from `ids[..=i]`), its weight in
    /// the loss: the document's tokens share [`DOCUMENT_WEIGHT`], the answers
    /// one. The last token of a block predicts nothing.
    weights: Vec<f32>,
    /// The predicted positions of each answer's first token.
    answer_starts: Vec<u32>,
}

impl Sequence {
    fn new(tokenizer: &TextTokenizer, doc: &[Example]) -> anyhow::Result<Sequence> {
        let mut ids = tokenizer.context_ids(&doc[0].context)?;
        let context = ids.len();
        let mut positions: Vec<u32> = (1..=context as u32).collect();
        let mut blocks = vec![0; context];
        let mut weights = vec![DOCUMENT_WEIGHT / (context - 1) as f32; context - 1];
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
        let mut answer_starts = Vec::with_capacity(doc.len());
        for (k, (example, answer)) in doc.iter().zip(answers).enumerate() {
            let question = tokenizer.question_ids(&example.question)?;
            let block = question.len() + answer.len();
            // No loss on the question, nor on its first token from the token
            // before the block (the document's or the previous block's last).
            weights.extend(std::iter::repeat_n(0.0, question.len()));
            answer_starts.push(weights.len() as u32);
            weights.extend(std::iter::repeat_n(
                1.0 / answer_tokens as f32,
                answer.len(),
            ));
            positions.extend((1..=block as u32).map(|p| context as u32 + p));
            blocks.extend(std::iter::repeat_n(k as u32 + 1, block));
            ids.extend(question);
            ids.extend(answer);
        }
        Ok(Sequence {
            ids,
            positions,
            blocks,
            weights,
            answer_starts,
        })
    }

    /// Who sees whom: the document causally; each question block the
    /// document and its own tokens causally.
    fn mask(&self, device: &Device) -> anyhow::Result<Tensor> {
        let n = self.ids.len() - 1;
        let blocks = &self.blocks;
        Ok(mask::additive_from_fn(n, n, device, |i, j| {
            j <= i && (blocks[j] == 0 || blocks[j] == blocks[i])
        })?)
    }
}

/// The loss of one sequence and how many of its answers' first tokens the
/// model predicts (greedy).
fn sequence_loss(decoder: &Decoder, sequence: &Sequence) -> anyhow::Result<(Tensor, usize)> {
    let device = decoder.device();
    let ids = &sequence.ids;
    let n = ids.len() - 1;
    let inputs = Tensor::new(&ids[..n], device)?.unsqueeze(0)?;
    let targets = Tensor::new(&ids[1..], device)?;
    let positions = Tensor::new(&sequence.positions[..n], device)?.unsqueeze(0)?;
    let embeds = decoder.embed(&inputs)?;
    let mask = sequence.mask(device)?;
    let out = decoder.forward(ForwardInput {
        mask: AttentionMask::Additive(&mask),
        path: ForwardPath::Training,
        ..ForwardInput::causal(&embeds, &positions)
    })?;
    let logits = decoder.logits(&out.hidden)?.squeeze(0)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let loss = (picked * Tensor::new(sequence.weights.as_slice(), device)?)?
        .sum_all()?
        .neg()?;
    let starts = Tensor::new(sequence.answer_starts.as_slice(), device)?;
    let guessed = logits.index_select(&starts, 0)?.argmax(D::Minus1)?;
    let correct = guessed
        .eq(&targets.index_select(&starts, 0)?)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok((loss, correct as usize))
}

/// Fills every weight with N(0, 1/fan_in) noise, norms with ones, from
/// `seed`. GPT-2's N(0, 0.02) leaves a model this narrow with near-uniform
/// attention and query/key gradients a hundred times smaller than the
/// values': it sat at the answers' prior (8 %) for thousands of steps.
fn randomize(varmap: &VarMap, seed: u64) -> anyhow::Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let init = if name.ends_with("norm.weight") {
            Tensor::ones(var.shape(), DType::F32, var.device())?
        } else {
            let fan_in = var.dims()[var.rank() - 1];
            let normal = Normal::new(0f32, (fan_in as f32).powf(-0.5))?;
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| normal.sample(&mut rng))
                .collect();
            Tensor::from_vec(values, var.shape(), var.device())?
        };
        var.set(&init)?;
    }
    Ok(())
}

/// Trains the model in `dir` (config.json, tokenizer) on fresh documents
/// about `names`, and writes its weights to `dir/model.safetensors`.
pub fn train(dir: &Path, names: &[String], settings: &BaseSettings) -> anyhow::Result<()> {
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
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed + 1);
    let warmup = (settings.steps / 20).max(1);
    let started = Instant::now();
    let (mut losses, mut correct, mut asked, mut tokens) = (Vec::new(), 0, 0, 0);
    let mut level = 0;
    for step in 0..settings.steps {
        let progress = step as f64 / settings.steps as f64;
        let mut step_loss = Vec::new();
        let mut step_tokens = 0;
        while step_tokens < settings.tokens_per_step {
            let doc = document(names, LEVELS[level].clone(), TRAINING_QUESTIONS, &mut rng);
            let sequence = Sequence::new(&tokenizer, &doc)?;
            let (loss, right) = sequence_loss(&decoder, &sequence)?;
            step_loss.push(loss);
            step_tokens += sequence.ids.len();
            correct += right;
            asked += doc.len();
        }
        tokens += step_tokens;
        let loss = (Tensor::stack(&step_loss, 0)?.sum_all()? / step_loss.len() as f64)?;
        let lr = if step < warmup {
            settings.lr * (step + 1) as f64 / warmup as f64
        } else {
            settings.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        };
        optimizer.set_learning_rate(lr);
        optimizer.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
        if (step + 1) % 25 == 0 || step + 1 == settings.steps {
            let mean = losses.iter().sum::<f32>() / losses.len() as f32;
            let accuracy = correct as f64 / asked.max(1) as f64;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "base model: step {} / {}, {:?} people, loss {mean:.3}, answers {:.1} %, {:.0} tokens/s, {seconds:.0} s",
                step + 1,
                settings.steps,
                LEVELS[level],
                100.0 * accuracy,
                tokens as f64 / seconds,
            );
            if accuracy >= LEVEL_UP_ACCURACY && level + 1 < LEVELS.len() {
                level += 1;
            }
            (losses, correct, asked) = (Vec::new(), 0, 0);
        }
    }
    varmap.save(dir.join("model.safetensors"))?;
    Ok(())
}
