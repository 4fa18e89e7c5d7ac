//! What a run is before it starts: its output directory checked, its
//! adapter's shape, its data, its size, and the settings a resumed run must
//! share with its checkpoint.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;
use serde_json::Value;

use std::collections::HashMap;

use candle_core::Tensor;

use crate::adapter::gmsa::DecoderLora;
use crate::adapter::{self, AdapterConfig, Config, GmsaAdapter, GmsaConfig, SacAdapter};
use crate::error::{Error, Result};
use crate::fingerprint::DigestCache;
use crate::layout::chunk;
use crate::layout::{self, FitError};
use crate::model::LoraTarget;
use crate::runtime::LoadedModel;
use crate::tokens::TokenizerError;

use super::data::TrainSet;
use super::gmsa::RESTATE;
use super::schedule::Schedule;
use super::{
    DEFAULT_DECODER_LORA_RANK, DEFAULT_ENCODER_LAYERS, DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS,
    DEFAULT_LSA_LAYERS, DEFAULT_MERGE_SIZE, GMSA_LORA_ALPHA, LORA_SCALE, Length, Plan, Stage,
    TrainMethod, TrainSettings, checkpoint, log,
};

/// Why a run cannot start as asked. The settings are named as
/// [`TrainSettings`] names them; the command line turns them into flags.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{method} does not train a {stage} stage (it trains {})", stages.join(", "))]
    StageNotFor {
        method: &'static str,
        stage: &'static str,
        stages: Vec<&'static str>,
    },
    #[error("{method}'s LoRA cannot adapt {target}")]
    TargetNotFor {
        method: &'static str,
        target: &'static str,
    },
    #[error("{setting} is {method}'s setting only")]
    SettingNotFor {
        setting: &'static str,
        method: &'static str,
    },
    #[error(
        "{method}'s {stage} stage trains the decoder of a trained compressor, and no adapter to start from was given"
    )]
    NeedsInit {
        method: &'static str,
        stage: &'static str,
    },
    #[error("the initial adapter is {found}'s, not {method}'s")]
    InitMethod {
        found: &'static str,
        method: &'static str,
    },
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
    #[error("a {max_context}-token text restated in full")]
    TextTooLong {
        max_context: usize,
        #[source]
        fit: FitError,
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
    /// Left out for SAC, so that checkpoints from before GMSA still resume.
    #[serde(skip_serializing_if = "is_sac")]
    method: &'static str,
    model: &'a str,
    data: String,
    stage: &'static str,
    init: Option<String>,
    ratio: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder_layers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lsa_layers: Option<usize>,
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

fn is_sac(method: &&'static str) -> bool {
    *method == TrainMethod::Sac.name()
}

fn are_default_targets(names: &&[String]) -> bool {
    LoraTarget::from_names(names) == DEFAULT_LORA_TARGETS
        && names.len() == DEFAULT_LORA_TARGETS.len()
}

/// Refuses a stage, a LoRA target or a setting the method does not have.
pub fn check_method(settings: &TrainSettings) -> Result<()> {
    let method = settings.method;
    if !method.stages().contains(&settings.stage) {
        return Err(SetupError::StageNotFor {
            method: method.name(),
            stage: settings.stage.name(),
            stages: method.stages().iter().map(|s| s.name()).collect(),
        }
        .into());
    }
    if method == TrainMethod::Gmsa && settings.stage == Stage::Qa && settings.init.is_none() {
        return Err(SetupError::NeedsInit {
            method: method.name(),
            stage: settings.stage.name(),
        }
        .into());
    }
    let allowed = method.lora_targets();
    if let Some(t) = settings
        .lora_targets
        .iter()
        .flatten()
        .find(|t| !allowed.contains(t))
    {
        return Err(SetupError::TargetNotFor {
            method: method.name(),
            target: t.name(),
        }
        .into());
    }
    let (setting, owner) = match method {
        TrainMethod::Sac if settings.encoder_layers.is_some() => ("encoder-layers", "gmsa"),
        TrainMethod::Sac if settings.lsa_layers.is_some() => ("lsa-layers", "gmsa"),
        TrainMethod::Gmsa if settings.chunk_size.is_some() => ("chunk-size", "sac"),
        _ => return Ok(()),
    };
    Err(SetupError::SettingNotFor {
        setting,
        method: owner,
    }
    .into())
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

/// The `--init` adapter's config and tensors (f32), checked against the
/// model (unless `any_model`: its shapes are checked on loading either way);
/// a SAC adapter is moved to `--ratio` if that differs from its own.
pub fn load_init(
    dir: &Path,
    settings: &TrainSettings,
    model: &LoadedModel,
) -> Result<(Config, HashMap<String, Tensor>)> {
    let config = Config::load(dir)?;
    let device = model.decoder.device();
    let found = config.trained().method.name;
    if found != settings.method.name() {
        return Err(SetupError::InitMethod {
            found,
            method: settings.method.name(),
        }
        .into());
    }
    let mismatch =
        config
            .trained_on()
            .model_mismatch(dir, &model.files.id, &model.fingerprint.model);
    if let Some(why) = mismatch.filter(|_| !settings.init_any_model) {
        return Err(SetupError::InitForAnotherModel(Box::new(why)).into());
    }
    Ok(match config {
        Config::Sac(_) => {
            let adapter = SacAdapter::load(dir, &model.config, device, DType::F32)?;
            let adapter = match settings.ratio {
                Some(ratio) => adapter.at_ratio(ratio)?,
                None => adapter,
            };
            (Config::Sac(adapter.config.clone()), adapter.tensors()?)
        }
        Config::Gmsa(ref c) => {
            // Read once, checked whole, then taken as stored.
            let (path, tensors) = adapter::read_weights(dir, device)?;
            GmsaAdapter::from_tensors(c.clone(), tensors.clone(), &model.config, DType::F32)
                .map_err(|e| adapter::adapter_error(&path, e))?;
            (config, tensors)
        }
    })
}

/// `flag`, else `theirs` (the `--init` adapter's), else `default`; a flag
/// that contradicts `--init` is an error.
fn pick(
    flag: Option<usize>,
    theirs: Option<usize>,
    default: usize,
    name: &'static str,
) -> Result<usize> {
    match (flag, theirs) {
        (Some(f), Some(t)) if f != t => Err(SetupError::DiffersFromInit {
            setting: name,
            ours: f.to_string(),
            theirs: t.to_string(),
        }
        .into()),
        (Some(f), _) => Ok(f),
        (None, Some(t)) => Ok(t),
        (None, None) => Ok(default),
    }
}

/// The LoRA targets: the flag, else the `--init` adapter's, else `default`;
/// a flag that contradicts `--init` is an error.
fn pick_targets(
    flag: Option<&[LoraTarget]>,
    theirs: Option<&[String]>,
    default: &[LoraTarget],
) -> Result<Vec<String>> {
    match (flag, theirs) {
        (Some(flag), Some(theirs)) if LoraTarget::from_names(theirs) != flag => {
            Err(SetupError::DiffersFromInit {
                setting: "lora-targets",
                ours: LoraTarget::names(flag).join(","),
                theirs: theirs.join(","),
            }
            .into())
        }
        (Some(flag), _) => Ok(LoraTarget::names(flag)),
        (None, Some(theirs)) => Ok(theirs.to_vec()),
        (None, None) => Ok(LoraTarget::names(default)),
    }
}

/// The trained adapter's config: shape flags, else the `--init` adapter's,
/// else the defaults; a flag that contradicts `--init` is an error (but for
/// `--ratio`, which [`load_init`] has already applied to a SAC adapter, and
/// which a GMSA adapter's shapes do not depend on).
pub fn adapter_config(
    settings: &TrainSettings,
    init: Option<&Config>,
    model: &LoadedModel,
) -> Result<Config> {
    let base_model = model.files.id.clone();
    let base_model_fingerprint = Some(model.fingerprint.model.clone());
    let targets = settings.lora_targets.as_deref();
    Ok(match settings.method {
        TrainMethod::Sac => {
            let init = init.and_then(|c| match c {
                Config::Sac(c) => Some(c),
                Config::Gmsa(_) => None,
            });
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
            Config::Sac(AdapterConfig {
                method: crate::compress::sac::METHOD.name.into(),
                ratio,
                chunk_size,
                mem_size: init.map_or(chunk::mem_size(chunk_size, ratio), |c| c.mem_size),
                lora_rank: pick(
                    settings.lora_rank,
                    init.map(|c| c.lora_rank),
                    DEFAULT_LORA_RANK,
                    "lora-rank",
                )?,
                lora_scale: init.map_or(LORA_SCALE, |c| c.lora_scale),
                lora_targets: pick_targets(
                    targets,
                    init.map(|c| c.lora_targets.as_slice()),
                    &DEFAULT_LORA_TARGETS,
                )?,
                base_model,
                base_model_fingerprint,
            })
        }
        TrainMethod::Gmsa => {
            let init = init.and_then(|c| match c {
                Config::Gmsa(c) => Some(c),
                Config::Sac(_) => None,
            });
            // The LoRA flags shape the LoRA the stage trains: the encoder's
            // in stage 1, the decoder's in stage 2.
            let stage2 = settings.stage == Stage::Qa;
            let (encoder_rank, encoder_targets) = match stage2 {
                true => (None, None),
                false => (settings.lora_rank, targets),
            };
            let lora_rank = pick(
                encoder_rank,
                init.map(|c| c.lora_rank),
                DEFAULT_LORA_RANK,
                "lora-rank",
            )?;
            let init_decoder = init.and_then(|c| c.decoder_lora.as_ref());
            let decoder_lora = if stage2 {
                let rank = pick(
                    settings.lora_rank,
                    init_decoder.map(|d| d.rank),
                    DEFAULT_DECODER_LORA_RANK,
                    "lora-rank",
                )?;
                Some(DecoderLora {
                    rank,
                    scale: init_decoder.map_or(GMSA_LORA_ALPHA / rank as f64, |d| d.scale),
                    targets: pick_targets(
                        targets,
                        init_decoder.map(|d| d.targets.as_slice()),
                        &LoraTarget::ALL,
                    )?,
                })
            } else {
                init_decoder.cloned()
            };
            Config::Gmsa(GmsaConfig {
                method: crate::compress::gmsa::METHOD.name.into(),
                base_model,
                base_model_fingerprint,
                encoder_layers: pick(
                    settings.encoder_layers,
                    init.map(|c| c.encoder_layers),
                    DEFAULT_ENCODER_LAYERS.min(model.config.num_layers),
                    "encoder-layers",
                )?,
                merge_size: settings
                    .ratio
                    .or(init.map(|c| c.merge_size))
                    .unwrap_or(DEFAULT_MERGE_SIZE),
                lsa_layers: pick(
                    settings.lsa_layers,
                    init.map(|c| c.lsa_layers),
                    DEFAULT_LSA_LAYERS,
                    "lsa-layers",
                )?,
                lora_rank,
                lora_scale: init.map_or(GMSA_LORA_ALPHA / lora_rank as f64, |c| c.lora_scale),
                lora_targets: pick_targets(
                    encoder_targets,
                    init.map(|c| c.lora_targets.as_slice()),
                    &LoraTarget::ALL,
                )?,
                decoder_lora,
            })
        }
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
    config: &Config,
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
    let (chunk_size, encoder_layers, lsa_layers, lora_rank, lora_targets) = match config {
        Config::Sac(c) => (Some(c.chunk_size), None, None, c.lora_rank, &c.lora_targets),
        Config::Gmsa(c) => {
            // The LoRA the run trains: the decoder's in stage 2.
            let (rank, targets) = match (&c.decoder_lora, settings.stage) {
                (Some(d), Stage::Qa) => (d.rank, &d.targets),
                _ => (c.lora_rank, &c.lora_targets),
            };
            (
                None,
                Some(c.encoder_layers),
                Some(c.lsa_layers),
                rank,
                targets,
            )
        }
    };
    let id = RunIdentity {
        method: settings.method.name(),
        model: &model.fingerprint.model,
        data: format!("sha256:{data}"),
        stage: settings.stage.name(),
        init,
        ratio: config.trained().ratio,
        chunk_size,
        encoder_layers,
        lsa_layers,
        lora_rank,
        lora_targets,
        lr: settings.lr,
        warmup_steps: plan.warmup_steps,
        weight_decay: settings.weight_decay,
        max_grad_norm: settings.max_grad_norm,
        total_steps: plan.total_steps,
        batch: settings.batch,
        grad_accum: settings.grad_accum,
        seed: settings.seed,
        min_context: pretrain.then_some(w.min_context),
        max_context: (pretrain || settings.stage == Stage::Autoencode).then_some(w.max_context),
        continuation: pretrain.then_some(w.continuation),
    };
    serde_json::to_value(id).map_err(|e| Error::Serialize {
        what: "the run's settings".into(),
        source: Box::new(e),
    })
}

/// The training examples of `settings.data`, with the number of pretraining
/// texts too short to use.
pub fn train_set(
    settings: &TrainSettings,
    config: &Config,
    model: &LoadedModel,
) -> Result<(TrainSet, usize)> {
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
        Stage::Autoencode => {
            let w = settings.window;
            let restate = model.tokenizer.encode(RESTATE)?;
            // The decoder reads the soft tokens, the prompt and the text.
            layout::check_fits(
                &model.config,
                w.max_context.div_ceil(config.trained().ratio),
                layout::room(0, restate.len(), w.max_context + 1),
            )
            .map_err(|fit| SetupError::TextTooLong {
                max_context: w.max_context,
                fit,
            })?;
            let loaded = TrainSet::autoencode(
                &settings.data,
                &model.tokenizer,
                &restate,
                w.max_context,
                eos(model)?,
                settings.seed,
            )?;
            Ok((loaded.data, loaded.skipped))
        }
        Stage::Qa => {
            let eos = eos(model)?;
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

fn eos(model: &LoadedModel) -> Result<u32> {
    Ok(*model.tokenizer.eos().first().ok_or(TokenizerError::NoEos)?)
}
