//! `sac train`: learns a SAC adapter (role embeddings, `[AE]`/`[LM]`, LoRA
//! on attention projections) with the base model frozen, by next-token
//! cross-entropy through the frozen decoder reading the anchors' K/V (docs/method.md,
//! "Training: two stages"); or GMSA's compressor (the encoder's LoRA and the
//! alignment block) by autoencoding through the frozen decoder reading the
//! soft tokens ([`gmsa`]), then its decoder's LoRA on questions with the
//! compressor frozen.
//!
//! One optimizer step: `grad_accum` backward passes over `batch` samples
//! each; per sample, the compressor runs the context chunk by chunk, the
//! decoder reads `[LM]`, the prompt and the target after the anchors, and
//! the loss flows back through the anchors' K/V into the adapter, one chunk
//! at a time ([`step::backward`]). Gradients are summed in f32,
//! clipped by global norm, and applied by AdamW under a warmup + cosine
//! schedule. Everything random derives from the seed, and the data order
//! from the seed and the sample's index, so a checkpoint (variables,
//! moments, step) is all a resumed run needs to continue exactly.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod gmsa;
pub mod log;
pub mod metrics;
pub mod optimizer;
pub mod params;
pub mod schedule;
mod setup;
pub mod step;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{Value, json};

use crate::adapter::gmsa::DECODER_PREFIX;
use crate::error::{Error, Result};
use crate::model::LoraTarget;
use crate::runtime::LoadedModel;

pub use checkpoint::CheckpointError;
pub use data::{DataError, PretrainWindow, RowProblem, Stage};
pub use eval::EvalScores;
pub use setup::SetupError;

use data::{EvalExample, TrainSet};
use optimizer::{AdamW, clip_global_norm};
use params::Trainables;
use schedule::Schedule;

/// LoRA rank of a fresh adapter (the reference's).
pub const DEFAULT_LORA_RANK: usize = 128;
/// The paper's: LoRA on the query and value projections.
pub const DEFAULT_LORA_TARGETS: [LoraTarget; 2] = [LoraTarget::Q, LoraTarget::V];
/// LoRA scale of a fresh adapter (fixed in the reference).
pub const LORA_SCALE: f64 = 2.0;
/// GMSA's encoder: the base model's first layers (the official script's).
pub const DEFAULT_ENCODER_LAYERS: usize = 8;
/// GMSA's alignment block: one layer (the official script's).
pub const DEFAULT_LSA_LAYERS: usize = 1;
/// GMSA's merge size of a fresh adapter.
pub const DEFAULT_MERGE_SIZE: usize = 4;
/// GMSA's LoRA alpha (the official script's); the scale is alpha / rank.
pub const GMSA_LORA_ALPHA: f64 = 32.0;
/// LoRA rank of GMSA's decoder in stage 2 (the official code fine-tunes
/// the whole decoder; a LoRA keeps the adapter portable).
pub const DEFAULT_DECODER_LORA_RANK: usize = 16;

/// The compressor a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMethod {
    Sac,
    Gmsa,
}

impl TrainMethod {
    pub fn name(self) -> &'static str {
        match self {
            TrainMethod::Sac => crate::compress::sac::METHOD.name,
            TrainMethod::Gmsa => crate::compress::gmsa::METHOD.name,
        }
    }

    /// The stages this method trains.
    pub fn stages(self) -> &'static [Stage] {
        match self {
            TrainMethod::Sac => &[Stage::Pretrain, Stage::Qa],
            TrainMethod::Gmsa => &[Stage::Autoencode, Stage::Qa],
        }
    }

    /// Whether `stage` trains the adapter tensor `name`; the others stay
    /// at the `--init` adapter's values. GMSA's qa stage (its second) trains
    /// the decoder's LoRA alone, and its autoencoding everything else; SAC's
    /// stages train everything.
    pub fn trains(self, stage: Stage, name: &str) -> bool {
        match self {
            TrainMethod::Sac => true,
            TrainMethod::Gmsa => name.starts_with(DECODER_PREFIX) == (stage == Stage::Qa),
        }
    }

    /// The projections its LoRA may adapt: SAC's attention only.
    pub fn lora_targets(self) -> &'static [LoraTarget] {
        match self {
            TrainMethod::Sac => &LoraTarget::ATTENTION,
            TrainMethod::Gmsa => &LoraTarget::ALL,
        }
    }
}

/// How long a run lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Steps(usize),
    Epochs(usize),
}

/// A run's settings, validated from the flags.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub method: TrainMethod,
    pub stage: Stage,
    pub data: PathBuf,
    pub eval: Option<PathBuf>,
    pub out: PathBuf,
    /// Adapter to start from instead of a fresh one.
    pub init: Option<PathBuf>,
    /// Take `init` even if it names another model's fingerprint.
    pub init_any_model: bool,
    /// `None`: the `--init` adapter's, else the default.
    pub ratio: Option<usize>,
    pub chunk_size: Option<usize>,
    pub lora_rank: Option<usize>,
    /// `None`: the `--init` adapter's, else [`DEFAULT_LORA_TARGETS`] (SAC)
    /// or all of [`LoraTarget::ALL`] (GMSA); in [`LoraTarget::ALL`]'s order,
    /// each once.
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// GMSA: `None`: the `--init` adapter's, else [`DEFAULT_ENCODER_LAYERS`].
    pub encoder_layers: Option<usize>,
    /// GMSA: `None`: the `--init` adapter's, else [`DEFAULT_LSA_LAYERS`].
    pub lsa_layers: Option<usize>,
    pub lr: f64,
    /// `None`: [`Schedule::default_warmup`].
    pub warmup_steps: Option<usize>,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Samples per backward pass.
    pub batch: usize,
    /// Backward passes per optimizer step.
    pub grad_accum: usize,
    pub length: Length,
    pub save_every: usize,
    /// End this run after this many steps (of the whole schedule).
    pub stop_after: Option<usize>,
    pub resume: bool,
    pub seed: u64,
    pub window: PretrainWindow,
    pub eval_max_tokens: usize,
}

/// The independent random streams of a run, each keyed by the seed.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Init = 1,
    Order = 2,
    Window = 3,
}

/// The `index`-th generator of `stream`: ChaCha8, whose output is fixed
/// by its key and stream number on every platform and version.
fn rng(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8] = stream as u8;
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(index);
    rng
}

/// The run's size, fixed before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub samples_per_step: usize,
    /// The step this run stops at (`--stop-after`, else `total_steps`).
    pub stop: usize,
}

/// One optimizer step, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Steps done, this one included.
    pub step: usize,
    /// Mean cross-entropy of the step's samples.
    pub loss: f64,
    pub lr: f64,
    /// Before clipping.
    pub grad_norm: f64,
    /// Context and decoder tokens read.
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// What a run reports while it goes.
#[derive(Debug)]
pub enum Event<'e> {
    Step(&'e StepReport),
    /// A checkpoint and the adapter were written after this many steps.
    Saved(usize),
    Eval(usize, &'e EvalScores),
}

/// A run ready to go: model, data, variables and optimizer state.
#[derive(Debug)]
pub struct Trainer<'a> {
    model: &'a LoadedModel,
    settings: TrainSettings,
    plan: Plan,
    identity: Value,
    train: TrainSet,
    eval: Vec<EvalExample>,
    params: Trainables,
    optimizer: AdamW,
    step: usize,
    skipped: usize,
}

impl<'a> Trainer<'a> {
    /// Checks the output directory, reads the data and sets up the variables
    /// (fresh, from `--init`, or from the checkpoint with `--resume`).
    /// Writes nothing.
    pub fn new(model: &'a LoadedModel, settings: TrainSettings) -> Result<Self> {
        setup::check_method(&settings)?;
        setup::check_output(&settings.out, settings.resume)?;
        let init = settings
            .init
            .as_deref()
            .map(|dir| setup::load_init(dir, &settings, model))
            .transpose()?;
        let config = setup::adapter_config(&settings, init.as_ref().map(|(c, _)| c), model)?;
        let (train, skipped) = setup::train_set(&settings, &config, model)?;
        let eval = match &settings.eval {
            Some(path) => data::eval_examples(path, &model.tokenizer, &model.config)?,
            None => Vec::new(),
        };
        let plan = setup::plan(&settings, train.len());
        let identity = setup::identity(&settings, &config, &plan, model)?;
        let device = model.decoder.device();
        let (method, stage) = (settings.method, settings.stage);
        let trains = move |name: &str| method.trains(stage, name);
        let (params, optimizer, step) = if settings.resume {
            let saved = checkpoint::load(&settings.out, device)?;
            if let Some((name, was, now)) = checkpoint::first_difference(&saved.run, &identity) {
                return Err(SetupError::ResumeDiffers {
                    checkpoint: checkpoint::path(&settings.out),
                    setting: name,
                    was,
                    now,
                }
                .into());
            }
            if saved.step >= plan.stop {
                return Err(SetupError::NothingLeft {
                    dir: settings.out.clone(),
                    step: saved.step,
                    stop: plan.stop,
                }
                .into());
            }
            // The checkpoint holds what the run trains; the rest is the
            // --init adapter's, which the run's identity pins.
            let mut tensors = saved.params;
            for (name, t) in init.into_iter().flat_map(|(_, tensors)| tensors) {
                if !trains(&name) {
                    tensors.entry(name).or_insert(t);
                }
            }
            let params =
                Trainables::from_tensors(saved.adapter, tensors, &model.config, device, trains)?;
            let optimizer = AdamW::restore(
                &params.vars(),
                settings.weight_decay,
                saved.first_moments,
                saved.second_moments,
                saved.step,
            )?;
            (params, optimizer, saved.step)
        } else {
            let params = match init {
                Some((_, mut tensors)) => {
                    // What the --init adapter lacks (the decoder LoRA of
                    // GMSA's second stage) starts fresh.
                    let fresh =
                        params::fresh_tensors(&config, &model.decoder, settings.seed, |n| {
                            !tensors.contains_key(n)
                        })?;
                    tensors.extend(fresh);
                    Trainables::from_tensors(config, tensors, &model.config, device, trains)?
                }
                None => Trainables::init(config, &model.decoder, settings.seed)?,
            };
            let optimizer = AdamW::new(&params.vars(), settings.weight_decay)?;
            (params, optimizer, 0)
        };
        Ok(Trainer {
            model,
            settings,
            plan,
            identity,
            train,
            eval,
            params,
            optimizer,
            step,
            skipped,
        })
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// Steps done so far (the checkpoint's, for a resumed run).
    pub fn step(&self) -> usize {
        self.step
    }

    /// Pretraining texts too short to use.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Trains up to the plan's stop, writing `log.jsonl` as it goes and a
    /// checkpoint, the adapter and (with `--eval`) scores every
    /// `save_every` steps and at the end.
    pub fn run(&mut self, mut observe: impl FnMut(Event)) -> Result<()> {
        let out = self.settings.out.clone();
        std::fs::create_dir_all(&out)
            .map_err(|e| Error::io("cannot create output directory", &out, e))?;
        let mut log = if self.settings.resume {
            log::RunLog::resume(&out, self.step)?
        } else {
            log::RunLog::create(&out)?
        };
        while self.step < self.plan.stop {
            let report = self.train_step()?;
            log.write(&json!(report))?;
            observe(Event::Step(&report));
            if self.step.is_multiple_of(self.settings.save_every) || self.step == self.plan.stop {
                self.save()?;
                observe(Event::Saved(self.step));
                if !self.eval.is_empty() {
                    let scores = self.evaluate()?;
                    log.write(&json!({
                        "step": self.step,
                        "eval_em": scores.em,
                        "eval_f1": scores.f1,
                        "eval_examples": scores.examples,
                    }))?;
                    observe(Event::Eval(self.step, &scores));
                }
            }
        }
        Ok(())
    }

    /// One optimizer step over the next `samples_per_step` samples.
    fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let (batch, per_step) = (self.settings.batch, self.plan.samples_per_step);
        let mut grads: Vec<Tensor> = Vec::new();
        let (mut loss, mut tokens) = (0.0, 0);
        for micro in 0..self.settings.grad_accum {
            let first = self.step * per_step + micro * batch;
            let samples: Vec<_> = (first..first + batch)
                .map(|index| self.train.sample(index as u64))
                .collect();
            tokens += samples.iter().map(|s| s.tokens()).sum::<usize>();
            let (part, part_grads) = step::backward(
                &self.model.decoder,
                &self.params,
                &samples,
                1.0 / per_step as f64,
            )?;
            loss += part;
            if grads.is_empty() {
                grads = part_grads;
            } else {
                for (sum, g) in grads.iter_mut().zip(part_grads) {
                    *sum = (&*sum + g)?;
                }
            }
        }
        let grad_norm = clip_global_norm(&mut grads, self.settings.max_grad_norm)?;
        let lr = Schedule {
            peak: self.settings.lr,
            warmup_steps: self.plan.warmup_steps,
            total_steps: self.plan.total_steps,
        }
        .lr(self.step);
        self.optimizer.step(&self.params.vars(), &grads, lr)?;
        self.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
        })
    }

    /// Writes the checkpoint, then the adapter directory.
    fn save(&self) -> Result<()> {
        let out = &self.settings.out;
        checkpoint::save(
            out,
            self.step,
            &self.identity,
            &self.params,
            &self.optimizer,
        )?;
        self.params.save(out)
    }

    fn evaluate(&self) -> Result<EvalScores> {
        let decoder = &self.model.decoder;
        let adapter = self.params.snapshot(&self.model.config, decoder.dtype())?;
        eval::evaluate(
            decoder,
            &self.model.tokenizer,
            &adapter,
            &self.eval,
            self.settings.eval_max_tokens,
        )
    }
}
