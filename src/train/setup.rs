//! What a run is before it starts: its output directory checked, its
//! adapter's shape, its data, its size, and the settings a resumed run must
//! share with its checkpoint.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;
use serde_json::Value;

use crate::adapter::{self, AdapterConfig, SacAdapter, TrainedOn};
use crate::error::{Error, Result};
use crate::fingerprint::DigestCache;
use crate::layout::chunk;
use crate::layout::{self, FitError};
use crate::model::LoraTarget;
use crate::runtime::LoadedModel;
use crate::tokens::TokenizerError;

use super::data::TrainSet;
use super::schedule::Schedule;
use super::{
    DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS, LORA_SCALE, Length, Plan, Stage, TrainSettings,
    checkpoint, log,
};

/// Why a run cannot start as asked. The settings are named as
/// [`TrainSettings`] names them; the command line turns them into flags.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the output {} is a file, not a directory", .0.display())]
    OutIsFile(PathBuf),
    #[error("{} holds no {file} to continue from", dir.display())]
    NothingToResume { dir: PathBuf, file: &'static str },
    #[error("{} already holds a training run or an adapter", .0.display())]
    RunExists(PathBuf),
    /// The initial adapter was trained on another model.
    #[error("{0}")]
    InitForAnotherModel(Box<adapter::ModelMismatch>),
    #[error("{} was written by a run with {setting} {was}, not {now}; resume with the same settings", checkpoint.display())]
    ResumeDiffers {
        checkpoint: PathBuf,
        setting: String,
        was: String,
        now: String,
    },
    #[error("{} is at step {step} of {stop}: nothing left to do", dir.display())]
    NothingLeft {
        dir: PathBuf,
        step: usize,
        stop: usize,
    },
    #[error("{setting} {ours} differs from the initial adapter's {theirs}")]
    DiffersFromInit {
        setting: &'static str,
        ours: String,
        theirs: String,
    },
    #[error("a {max_context}-token context with a {continuation}-token continuation")]
    WindowTooLong {
        max_context: usize,
        continuation: usize,
        #[source]
        fit: FitError,
    },
}

/// The settings that decide what a run computes; a resumed run must match
/// them (what only affects reporting, such as `--eval`, may change).
#[derive(Debug, Serialize)]
struct RunIdentity<'a> {
    model: &'a str,
    data: String,
    stage: &'static str,
    init: Option<String>,
    ratio: usize,
    chunk_size: usize,
    lora_rank: usize,
    /// Left out for the paper's q/v, so that checkpoints from before the
    /// targets could be chosen still resume.
    #[serde(skip_serializing_if = "are_default_targets")]
    lora_targets: &'a [String],
    lr: f64,
    warmup_steps: usize,
    weight_decay: f64,
    max_grad_norm: f64,
    total_steps: usize,
    batch: usize,
    grad_accum: usize,
    seed: u64,
    min_context: Option<usize>,
    max_context: Option<usize>,
    continuation: Option<usize>,
}

fn are_default_targets(names: &&[String]) -> bool {
    LoraTarget::from_names(names) == DEFAULT_LORA_TARGETS
        && names.len() == DEFAULT_LORA_TARGETS.len()
}

/// Refuses to start over a run (without `--resume`) or to resume nothing.
pub fn check_output(out: &Path, resume: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(SetupError::OutIsFile(out.to_path_buf()).into());
    }
    let has_checkpoint = checkpoint::path(out).is_file();
    if resume && !has_checkpoint {
        return Err(SetupError::NothingToResume {
            dir: out.to_path_buf(),
            file: checkpoint::FILE,
        }
        .into());
    }
    let taken = [
        checkpoint::FILE,
        adapter::CONFIG_FILE,
        adapter::WEIGHTS_FILE,
        log::FILE,
    ]
    .iter()
    .any(|f| out.join(f).exists());
    if !resume && taken {
        return Err(SetupError::RunExists(out.to_path_buf()).into());
    }
    Ok(())
}

/// The `--init` adapter in f32, checked against the model (unless
/// `any_model`: its shapes are checked on loading either way), and moved to
/// `--ratio` if that differs from its own.
pub fn load_init(
    dir: &Path,
    ratio: Option<usize>,
    any_model: bool,
    model: &LoadedModel,
) -> Result<SacAdapter> {
    let adapter = SacAdapter::load(dir, &model.config, model.decoder.device(), DType::F32)?;
    let mismatch = adapter
        .config
        .model_mismatch(dir, &model.files.id, &model.fingerprint.model);
    if let Some(why) = mismatch.filter(|_| !any_model) {
        return Err(SetupError::InitForAnotherModel(Box::new(why)).into());
    }
    match ratio {
        Some(ratio) => adapter.at_ratio(ratio),
        None => Ok(adapter),
    }
}

/// The trained adapter's config: shape flags, else the `--init` adapter's,
/// else the defaults; a flag that contradicts `--init` is an error (but for
/// `--ratio`, which [`load_init`] has already applied).
pub fn adapter_config(
    settings: &TrainSettings,
    init: Option<&AdapterConfig>,
    model: &LoadedModel,
) -> Result<AdapterConfig> {
    let pick =
        |flag: Option<usize>, theirs: Option<usize>, default: usize, name: &'static str| match (
            flag, theirs,
        ) {
            (Some(f), Some(t)) if f != t => Err(SetupError::DiffersFromInit {
                setting: name,
                ours: f.to_string(),
                theirs: t.to_string(),
            }),
            (Some(f), _) => Ok(f),
            (None, Some(t)) => Ok(t),
            (None, None) => Ok(default),
        };
    let ratio = pick(
        settings.ratio,
        init.map(|c| c.ratio),
        chunk::DEFAULT_RATIO,
        "ratio",
    )?;
    let chunk_size = pick(
        settings.chunk_size,
        init.map(|c| c.chunk_size),
        chunk::DEFAULT_CHUNK_SIZE,
        "chunk-size",
    )?;
    let lora_rank = pick(
        settings.lora_rank,
        init.map(|c| c.lora_rank),
        DEFAULT_LORA_RANK,
        "lora-rank",
    )?;
    let lora_targets = match (&settings.lora_targets, init) {
        (Some(flag), Some(c)) if c.targets() != *flag => {
            return Err(SetupError::DiffersFromInit {
                setting: "lora-targets",
                ours: LoraTarget::names(flag).join(","),
                theirs: c.lora_targets.join(","),
            }
            .into());
        }
        (Some(flag), _) => LoraTarget::names(flag),
        (None, Some(c)) => c.lora_targets.clone(),
        (None, None) => LoraTarget::names(&DEFAULT_LORA_TARGETS),
    };
    Ok(AdapterConfig {
        method: crate::compress::sac::METHOD.name.into(),
        ratio,
        chunk_size,
        mem_size: init.map_or(chunk::mem_size(chunk_size, ratio), |c| c.mem_size),
        lora_rank,
        lora_scale: init.map_or(LORA_SCALE, |c| c.lora_scale),
        lora_targets,
        base_model: model.files.id.clone(),
        base_model_fingerprint: Some(model.fingerprint.model.clone()),
    })
}

pub fn plan(settings: &TrainSettings, rows: usize) -> Plan {
    let samples_per_step = settings.batch * settings.grad_accum;
    let total_steps = match settings.length {
        Length::Steps(n) => n,
        Length::Epochs(n) => (n * rows).div_ceil(samples_per_step),
    };
    Plan {
        total_steps,
        warmup_steps: settings
            .warmup_steps
            .unwrap_or_else(|| Schedule::default_warmup(total_steps)),
        samples_per_step,
        stop: settings
            .stop_after
            .map_or(total_steps, |s| s.min(total_steps)),
    }
}

pub fn identity(
    settings: &TrainSettings,
    config: &AdapterConfig,
    plan: &Plan,
    model: &LoadedModel,
) -> Result<Value> {
    let mut cache = DigestCache::open_default();
    let (_, data) = cache.file_digest(&settings.data)?;
    let init = settings
        .init
        .as_deref()
        .map(|dir| adapter::fingerprint(dir, &mut cache))
        .transpose()?;
    cache.save();
    let pretrain = settings.stage == Stage::Pretrain;
    let w = settings.window;
    let id = RunIdentity {
        model: &model.fingerprint.model,
        data: format!("sha256:{data}"),
        stage: settings.stage.name(),
        init,
        ratio: config.ratio,
        chunk_size: config.chunk_size,
        lora_rank: config.lora_rank,
        lora_targets: &config.lora_targets,
        lr: settings.lr,
        warmup_steps: plan.warmup_steps,
        weight_decay: settings.weight_decay,
        max_grad_norm: settings.max_grad_norm,
        total_steps: plan.total_steps,
        batch: settings.batch,
        grad_accum: settings.grad_accum,
        seed: settings.seed,
        min_context: pretrain.then_some(w.min_context),
        max_context: pretrain.then_some(w.max_context),
        continuation: pretrain.then_some(w.continuation),
    };
    serde_json::to_value(id).map_err(|e| Error::Serialize {
        what: "the run's settings".into(),
        source: Box::new(e),
    })
}

/// The training examples of `settings.data`, with the number of pretraining
/// texts too short to use.
pub fn train_set(settings: &TrainSettings, model: &LoadedModel) -> Result<(TrainSet, usize)> {
    match settings.stage {
        Stage::Pretrain => {
            let w = settings.window;
            layout::check_fits(
                &model.config,
                w.max_context,
                layout::room(1, 0, w.continuation),
            )
            .map_err(|fit| SetupError::WindowTooLong {
                max_context: w.max_context,
                continuation: w.continuation,
                fit,
            })?;
            let loaded = TrainSet::pretrain(&settings.data, &model.tokenizer, w, settings.seed)?;
            Ok((loaded.data, loaded.skipped))
        }
        Stage::Qa => {
            let eos = *model.tokenizer.eos().first().ok_or(TokenizerError::NoEos)?;
            let set = TrainSet::qa(
                &settings.data,
                &model.tokenizer,
                &model.config,
                eos,
                settings.seed,
            )?;
            Ok((set, 0))
        }
    }
}
