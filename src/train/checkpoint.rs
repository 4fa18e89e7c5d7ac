//! Checkpoints: all a run needs to continue exactly (the adapter's variables,
//! AdamW's moments, the step, the settings that shape the run) in one
//! safetensors file written atomically, so an interrupted write leaves the
//! previous checkpoint whole and the parts can never come from different steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapter::Config;
use crate::error::{Error, Result};

use super::optimizer::AdamW;
use super::params::Trainables;

pub const FILE: &str = "checkpoint.safetensors";
/// The safetensors metadata key holding [`Meta`] as JSON.
const META_KEY: &str = "sac_train";
const FORMAT: u32 = 1;

const PARAM: &str = "param.";
const FIRST_MOMENT: &str = "adam_m.";
const SECOND_MOMENT: &str = "adam_v.";

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    /// Optimizer steps taken.
    step: usize,
    /// The settings that decide the run's trajectory (see `RunIdentity`).
    run: Value,
    /// The adapter's config, as `adapter_config.json` holds it.
    adapter: Value,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    pub step: usize,
    pub run: Value,
    pub adapter: Config,
    /// Named as in `adapter.safetensors`.
    pub params: HashMap<String, Tensor>,
    /// The moments in the order of [`Trainables::named`].
    pub first_moments: Vec<Tensor>,
    pub second_moments: Vec<Tensor>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes the checkpoint of `params` and `optimizer` after `step` steps.
pub fn save(
    dir: &Path,
    step: usize,
    run: &Value,
    params: &Trainables,
    optimizer: &AdamW,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let moments = optimizer
        .first_moments()
        .iter()
        .zip(optimizer.second_moments());
    for ((name, var), (m, v)) in params.named().zip(moments) {
        tensors.push((format!("{PARAM}{name}"), var.as_detached_tensor()));
        tensors.push((format!("{FIRST_MOMENT}{name}"), m.clone()));
        tensors.push((format!("{SECOND_MOMENT}{name}"), v.clone()));
    }
    let target = path(dir);
    let serialize = |e: Box<dyn std::error::Error + Send + Sync>| Error::Serialize {
        what: target.display().to_string(),
        source: e,
    };
    let meta = Meta {
        format: FORMAT,
        step,
        run: run.clone(),
        adapter: serde_json::to_value(params.config()).map_err(|e| serialize(e.into()))?,
    };
    let meta = serde_json::to_string(&meta).map_err(|e| serialize(e.into()))?;
    let bytes = safetensors::serialize(tensors, Some(HashMap::from([(META_KEY.into(), meta)])))
        .map_err(|e| serialize(e.into()))?;
    crate::atomic::write_bytes(&target, &bytes)
}

/// A checkpoint that cannot be read back, or does not fit the run.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: not a checkpoint", path.display())]
    NotCheckpoint {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: not a sac train checkpoint", .0.display())]
    NotOurs(PathBuf),
    #[error("{}: unreadable state", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: checkpoint format {found} is not {FORMAT}", path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("{}: unreadable tensors", path.display())]
    Tensors {
        path: PathBuf,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("{}: no optimizer state for `{name}`", path.display())]
    NoMoments { path: PathBuf, name: String },
    #[error("the optimizer state does not match the parameters")]
    OptimizerState,
}

/// Reads the checkpoint in `dir`.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let target = path(dir);
    let bytes = std::fs::read(&target).map_err(|e| Error::io("cannot read", &target, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|source| {
        CheckpointError::NotCheckpoint {
            path: target.clone(),
            source,
        }
    })?;
    let meta: Meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| CheckpointError::NotOurs(target.clone()))
        .and_then(|json| {
            serde_json::from_str(json).map_err(|source| CheckpointError::State {
                path: target.clone(),
                source,
            })
        })?;
    if meta.format != FORMAT {
        return Err(CheckpointError::Format {
            path: target,
            found: meta.format,
        }
        .into());
    }
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|source| {
        CheckpointError::Tensors {
            path: target.clone(),
            source: Box::new(source),
        }
    })?;
    let mut params = HashMap::new();
    let names: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix(PARAM).map(str::to_string))
        .collect();
    for name in &names {
        if let Some(t) = tensors.remove(&format!("{PARAM}{name}")) {
            params.insert(name.clone(), t);
        }
    }
    let mut sorted = names;
    sorted.sort();
    let mut moments = |prefix: &str| -> Result<Vec<Tensor>> {
        sorted
            .iter()
            .map(|name| {
                tensors.remove(&format!("{prefix}{name}")).ok_or_else(|| {
                    CheckpointError::NoMoments {
                        path: target.clone(),
                        name: name.clone(),
                    }
                    .into()
                })
            })
            .collect()
    };
    let first_moments = moments(FIRST_MOMENT)?;
    let second_moments = moments(SECOND_MOMENT)?;
    let adapter = Config::parse(&target, &meta.adapter.to_string())?;
    Ok(Checkpoint {
        step: meta.step,
        run: meta.run,
        adapter,
        params,
        first_moments,
        second_moments,
    })
}

/// The first setting in which `current` differs from `saved`, as
/// `(name, saved value, current value)`.
pub fn first_difference(saved: &Value, current: &Value) -> Option<(String, String, String)> {
    let (Value::Object(saved), Value::Object(current)) = (saved, current) else {
        return (saved != current)
            .then(|| ("settings".into(), saved.to_string(), current.to_string()));
    };
    let null = Value::Null;
    let mut keys: Vec<&String> = saved.keys().chain(current.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().find_map(|k| {
        let (a, b) = (
            saved.get(k).unwrap_or(&null),
            current.get(k).unwrap_or(&null),
        );
        (a != b).then(|| (k.clone(), a.to_string(), b.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_name_the_setting() {
        let saved = json!({"lr": 1e-4, "seed": 1});
        assert_eq!(first_difference(&saved, &saved), None);
        let (name, was, now) = first_difference(&saved, &json!({"lr": 2e-4, "seed": 1})).unwrap();
        assert_eq!(
            (name.as_str(), was.as_str(), now.as_str()),
            ("lr", "0.0001", "0.0002")
        );
        let (name, ..) = first_difference(&saved, &json!({"lr": 1e-4})).unwrap();
        assert_eq!(name, "seed");
    }
}
