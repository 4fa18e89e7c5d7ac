//! Step 2 of the quality benchmark: a tiny Llama trained from random weights,
//! every parameter, on the task with the whole document in view, so that the
//! task is solvable before anything is compressed.
//!
//! Each step reads fresh documents about training names, each followed by
//! its questions and answers in the prompt layout `sac ask` uses (see
//! [`Sequence`]), on a curriculum of growing documents. The loss weighs the
//! document's next-token loss by [`BaseSettings::document_weight`] beside
//! the answers' (with their EOS).

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use sac::model::{
    AttentionMask, Decoder, ForwardInput, HfFiles, ModelConfig, Path as ForwardPath, mask,
};
use sac::tokens::TextTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::{AnswerForm, Example, PEOPLE, Telling, training_document};

/// The tiny model's shape: `width` wide in heads of 32 (half as many K/V
/// heads), `layers` deep; its vocabulary comes from the tokenizer.
pub fn config(width: usize, layers: usize) -> Value {
    let heads = (width / 32).max(1);
    json!({
        "model_type": "llama", "hidden_size": width, "intermediate_size": 3 * width,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": (heads / 2).max(1), "head_dim": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": true
    })
}

pub struct BaseSettings {
    pub steps: usize,
    /// A wall-clock budget: training ends when either the steps or this
    /// run out, and the learning-rate schedule follows whichever is ahead.
    pub seconds: Option<f64>,
    /// Start from the weights already in the model directory instead of
    /// random ones, at the curriculum level they had reached.
    pub resume: bool,
    /// How many people the first level's documents are about, instead of
    /// the curriculum's first.
    pub first_level: Option<RangeInclusive<usize>>,
    /// Reverse questions ("Who lives in paris?") per training document,
    /// beside the test's kind.
    pub reverse_questions: usize,
    /// Training documents tell their facts twice (see [`Telling`]).
    pub repeat_facts: bool,
    /// The share of training documents whose facts are a name and a value
    /// alone (see [`Telling`]); their answers do not count towards the
    /// accuracy that moves the curriculum on.
    pub short_facts: f64,
    /// The curriculum starts with two levels about the first level's people
    /// and one attribute each: short facts, then the task's own.
    pub short_first: bool,
    /// Levels of two and then three attributes (the first level's people)
    /// come before the task's five, after those of `short_first`.
    pub grow_attributes: bool,
    /// Steps a level may run without passing before the curriculum goes
    /// back one level, until that one passes again: a way to test whether
    /// replaying the earlier levels is what breaks a plateau.
    pub replay_after: Option<usize>,
    /// Questions asked after each training document: many make most of a
    /// sequence's loss looking facts up; few leave room for more documents
    /// in a step (each question block attends to the whole document).
    pub questions: usize,
    /// The document's share of the loss beside the answers' one.
    pub document_weight: f32,
    pub form: AnswerForm,
    pub lr: f64,
    /// Training tokens per optimizer step (whole documents, at least one).
    pub tokens_per_step: usize,
    pub seed: u64,
    pub device: Device,
}

/// How many people training documents are about, level by level: short
/// documents first, where the answer is among few facts and the attention
/// has few places to look, growing to the test documents' size.
const LEVELS: [RangeInclusive<usize>; 7] = [1..=2, 2..=4, 3..=8, 5..=14, 8..=24, 12..=36, PEOPLE];

/// One level of the curriculum. Unknown fields are refused, so that a file
/// of an older curriculum (its `one_attribute`) is not read as another level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Level {
    people: RangeInclusive<usize>,
    /// Every fact is a name and a value alone (see [`Telling`]). Finding
    /// such a fact by name is learnt first, and from there the lookup
    /// across a fact's words follows within a few hundred steps (in the
    /// PyTorch drill of docs/benchmarks.md, 3,600 steps in all against
    /// 18,000 without this level).
    short: bool,
    /// How many attributes a document tells (see [`Telling`]), all when
    /// `None`: with all five from the start, a model finds the asked
    /// attribute's values first and sits at a coin toss between the people.
    attributes: Option<usize>,
}

impl Level {
    fn new(people: RangeInclusive<usize>) -> Level {
        Level {
            people,
            short: false,
            attributes: None,
        }
    }
}

/// The answer accuracy (first tokens, over one logging window) at which
/// training moves on to the next level.
const LEVEL_UP_ACCURACY: f64 = 0.9;

/// The share of training over which the learning rate warms up, before its
/// cosine decay.
const WARMUP: f64 = 0.05;

/// Steps between two saves of the weights, so that a run stopped early
/// (or out of time) leaves a model behind.
const CHECKPOINT_STEPS: usize = 500;

/// The curriculum's level at the last save, beside the weights, so that a
/// resumed run carries on there instead of relearning the levels before it
/// (a few hundred steps, during which the short facts fade).
const CURRICULUM_FILE: &str = "curriculum.json";

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
    /// the loss: the document's tokens share `document_weight`, the answers
    /// one. The last token of a block predicts nothing.
    weights: Vec<f32>,
    /// The predicted positions of the first token of the value in each
    /// scored answer (asked the test's way, about a test-like document).
    answer_starts: Vec<u32>,
}

impl Sequence {
    /// `doc`'s questions, asked the test's way, then `reverse` ones; the
    /// first `scored` of `doc`'s answers count towards the accuracy.
    fn new(
        tokenizer: &TextTokenizer,
        doc: &[Example],
        reverse: &[Example],
        scored: usize,
        document_weight: f32,
    ) -> anyhow::Result<Sequence> {
        let mut ids = tokenizer.context_ids(&doc[0].context)?;
        let context = ids.len();
        let mut positions: Vec<u32> = (1..=context as u32).collect();
        let mut blocks = vec![0; context];
        let mut weights = vec![document_weight / (context - 1) as f32; context - 1];
        let eos = *tokenizer
            .eos()
            .first()
            .context("the tokenizer has no EOS")?;
        let answers: Vec<Vec<u32>> = doc
            .iter()
            .chain(reverse)
            .map(|e| {
                let mut a = tokenizer.encode(&e.answer)?;
                a.push(eos);
                Ok(a)
            })
            .collect::<anyhow::Result<_>>()?;
        let answer_tokens: usize = answers.iter().map(Vec::len).sum();
        let mut answer_starts = Vec::with_capacity(doc.len());
        for (k, (example, answer)) in doc.iter().chain(reverse).zip(answers).enumerate() {
            let question = tokenizer.question_ids(&example.question)?;
            let block = question.len() + answer.len();
            // No loss on the question, nor on its first token from the token
            // before the block (the document's or the previous block's last).
            weights.extend(std::iter::repeat_n(0.0, question.len()));
            if k < scored {
                let before = tokenizer.encode(&example.before_value)?.len();
                answer_starts.push((weights.len() + before) as u32);
            }
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

    /// Who sees whom among the `n` input tokens of a batch padded to `n`:
    /// the document causally; each question block the document and its own
    /// tokens causally; the padding is a block of its own.
    fn mask(&self, n: usize, device: &Device) -> anyhow::Result<Tensor> {
        let inputs = self.ids.len() - 1;
        let block = |i: usize| if i < inputs { self.blocks[i] } else { u32::MAX };
        Ok(mask::additive_from_fn(n, n, device, |i, j| {
            j <= i && (block(j) == 0 || block(j) == block(i))
        })?)
    }
}

/// `values` then `fill` up to `n` items.
fn padded<T: Copy>(values: &[T], n: usize, fill: T) -> impl Iterator<Item = T> + '_ {
    values
        .iter()
        .copied()
        .chain(std::iter::repeat_n(fill, n - values.len()))
}

/// The mean loss of a batch of sequences, run as one forward pass with each
/// padded to the longest (the padding weighs nothing and nothing sees it),
/// and how many of their answers' values the model predicts (greedy, first
/// token).
fn batch_loss(decoder: &Decoder, batch: &[Sequence]) -> anyhow::Result<(Tensor, usize)> {
    let device = decoder.device();
    let n = batch
        .iter()
        .map(|s| s.ids.len() - 1)
        .max()
        .context("an empty batch")?;
    let (mut inputs, mut targets, mut positions, mut weights) = (vec![], vec![], vec![], vec![]);
    let (mut starts, mut masks) = (vec![], vec![]);
    for (row, sequence) in batch.iter().enumerate() {
        let (ids, len) = (&sequence.ids, sequence.ids.len() - 1);
        inputs.extend(padded(&ids[..len], n, 0));
        targets.extend(padded(&ids[1..], n, 0));
        positions.extend(padded(&sequence.positions[..len], n, 0));
        weights.extend(padded(&sequence.weights, n, 0.0));
        starts.extend(sequence.answer_starts.iter().map(|&i| (row * n) as u32 + i));
        masks.push(sequence.mask(n, device)?);
    }
    let rows = batch.len();
    let inputs = Tensor::from_vec(inputs, (rows, n), device)?;
    let targets = Tensor::new(targets.as_slice(), device)?;
    let positions = Tensor::from_vec(positions, (rows, n), device)?;
    let embeds = decoder.embed(&inputs)?;
    let mask = Tensor::stack(&masks, 0)?;
    let out = decoder.forward(ForwardInput {
        mask: AttentionMask::Additive(&mask),
        path: ForwardPath::Training,
        ..ForwardInput::causal(&embeds, &positions)
    })?;
    let logits = decoder.logits(&out.hidden)?.flatten_to(1)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let loss = ((picked * Tensor::new(weights.as_slice(), device)?)?
        .sum_all()?
        .neg()?
        / rows as f64)?;
    if starts.is_empty() {
        // Every document of the batch had short facts.
        return Ok((loss, 0));
    }
    let starts = Tensor::new(starts.as_slice(), device)?;
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

/// The learning rate `progress` of the way through training: a linear
/// warmup over [`WARMUP`], then a cosine decay to zero.
fn learning_rate(peak: f64, progress: f64) -> f64 {
    if progress < WARMUP {
        peak * (progress / WARMUP).max(0.01)
    } else {
        let decay = (progress - WARMUP) / (1.0 - WARMUP);
        peak * 0.5 * (1.0 + (std::f64::consts::PI * decay).cos())
    }
}

/// Writes the weights to `dir/model.safetensors` and the level reached to
/// [`CURRICULUM_FILE`], each atomically, so a reader (or a run stopped
/// mid-write) never sees half a file.
fn save(varmap: &VarMap, dir: &Path, level: &Level) -> anyhow::Result<()> {
    let tensors: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    let bytes = safetensors::serialize(tensors, None)?;
    sac::atomic::write_bytes(&dir.join("model.safetensors"), &bytes)?;
    Ok(sac::atomic::write_bytes(
        &dir.join(CURRICULUM_FILE),
        &serde_json::to_vec(level)?,
    )?)
}

/// Where a resumed run's curriculum starts: at the saved level when this
/// run's curriculum has it (the same flags), else at the first.
fn resumed_level(dir: &Path, levels: &[Level]) -> anyhow::Result<usize> {
    let path = dir.join(CURRICULUM_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let saved: Level = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a curriculum level", path.display()))?;
    Ok(levels.iter().position(|l| *l == saved).unwrap_or_else(|| {
        eprintln!("base model: this curriculum has no level {saved:?}; starting at its first");
        0
    }))
}

/// Trains the model in `dir` (config.json, tokenizer) on fresh documents
/// about `names`, and writes its weights to `dir/model.safetensors` every
/// [`CHECKPOINT_STEPS`] steps and at the end.
pub fn train(dir: &Path, names: &[String], settings: &BaseSettings) -> anyhow::Result<()> {
    let files = HfFiles {
        config: dir.join("config.json"),
        tokenizer: dir.join("tokenizer.json"),
        tokenizer_config: dir.join("tokenizer_config.json"),
        generation_config: None,
        weights: Vec::new(),
    };
    let config = ModelConfig::from_file(&files.config)?;
    let tokenizer = TextTokenizer::load(&files, &config)?;
    let device = &settings.device;
    let mut varmap = VarMap::new();
    let decoder = Decoder::load(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    if settings.resume {
        let weights = dir.join("model.safetensors");
        varmap
            .load(&weights)
            .with_context(|| format!("cannot resume from {}", weights.display()))?;
    } else {
        randomize(&varmap, settings.seed)?;
    }
    let mut optimizer = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: settings.lr,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed + 1);
    let started = Instant::now();
    let progress = |step: usize| {
        let by_steps = step as f64 / settings.steps as f64;
        let by_time = settings
            .seconds
            .map_or(0.0, |s| started.elapsed().as_secs_f64() / s);
        by_steps.max(by_time)
    };
    let (mut losses, mut correct, mut asked, mut tokens) = (Vec::new(), 0, 0, 0);
    let mut levels: Vec<Level> = LEVELS.iter().cloned().map(Level::new).collect();
    if let Some(first) = &settings.first_level {
        levels[0].people = first.clone();
    }
    let first_people = levels[0].people.clone();
    let telling_few = |count, short| Level {
        people: first_people.clone(),
        short,
        attributes: Some(count),
    };
    let mut start = Vec::new();
    if settings.short_first {
        start.extend([telling_few(1, true), telling_few(1, false)]);
    }
    if settings.grow_attributes {
        start.extend([telling_few(2, false), telling_few(3, false)]);
    }
    levels.splice(0..0, start);
    let mut level = if settings.resume {
        resumed_level(dir, &levels)?
    } else {
        0
    };
    let (mut step, mut level_steps) = (0, 0);
    let mut done = false;
    while !done {
        let mut batch = Vec::new();
        let mut step_tokens = 0;
        while step_tokens < settings.tokens_per_step {
            // Drawn only when asked for, so that other runs keep their documents.
            let mixed_in = !levels[level].short
                && settings.short_facts > 0.0
                && rng.random_bool(settings.short_facts);
            let short = levels[level].short || mixed_in;
            let telling = Telling {
                repeat: settings.repeat_facts,
                short,
                attributes: levels[level].attributes,
            };
            let (doc, reverse) = training_document(
                names,
                levels[level].people.clone(),
                settings.questions,
                settings.reverse_questions,
                telling,
                settings.form,
                &mut rng,
            );
            let scored = if mixed_in { 0 } else { doc.len() };
            let sequence =
                Sequence::new(&tokenizer, &doc, &reverse, scored, settings.document_weight)?;
            step_tokens += sequence.ids.len();
            asked += sequence.answer_starts.len();
            batch.push(sequence);
        }
        tokens += step_tokens;
        let (loss, right) = batch_loss(&decoder, &batch)?;
        correct += right;
        optimizer.set_learning_rate(learning_rate(settings.lr, progress(step).min(1.0)));
        optimizer.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
        step += 1;
        level_steps += 1;
        // Decided once, so that the last step is the one logged and saved
        // even when the wall clock ends training.
        done = progress(step) >= 1.0;
        if step % 25 == 0 || done {
            let mean = losses.iter().sum::<f32>() / losses.len() as f32;
            let accuracy = correct as f64 / asked.max(1) as f64;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "base model: step {step} / {}, {:?} people{}{}, loss {mean:.3}, answers {:.1} %, {:.0} tokens/s, {seconds:.0} s",
                settings.steps,
                levels[level].people,
                match levels[level].attributes {
                    Some(1) => ", one attribute".to_string(),
                    Some(count) => format!(", {count} attributes"),
                    None => String::new(),
                },
                if levels[level].short {
                    ", short facts"
                } else {
                    ""
                },
                100.0 * accuracy,
                tokens as f64 / seconds,
            );
            if accuracy >= LEVEL_UP_ACCURACY && level + 1 < levels.len() {
                level += 1;
                level_steps = 0;
            } else if level > 0 && settings.replay_after.is_some_and(|n| level_steps >= n) {
                eprintln!("base model: no pass in {level_steps} steps, back one level");
                level -= 1;
                level_steps = 0;
            }
            (losses, correct, asked) = (Vec::new(), 0, 0);
        }
        if step % CHECKPOINT_STEPS == 0 || done {
            save(&varmap, dir, &levels[level])?;
        }
    }
    Ok(())
}
