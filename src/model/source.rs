//! Where a model's files come from: a local directory, or a Hugging Face Hub
//! repository through hf-hub's cache (`HF_HOME`, `HF_HUB_CACHE`), which is used
//! as is when the files are there, so a cached model needs no network;
//! `HF_HUB_OFFLINE=1` forbids the network altogether.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use crate::error::{Error, Result};

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The files of one model, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named: a Hub id, or the directory as given.
    pub id: String,
    /// The Hub revision asked for (`None` for a local directory).
    pub revision: Option<String>,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: PathBuf,
    pub generation_config: Option<PathBuf>,
    /// One file, or the shards named by the index, in index order.
    pub weights: Vec<PathBuf>,
}

/// Resolves `model` (a directory, or a Hub id such as `meta-llama/Llama-3.2-1B`).
pub fn resolve(model: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_dir() {
        if revision.is_some() {
            return Err(Error::MissingModelFile(format!(
                "--revision applies to Hub ids, and `{model}` is a local directory"
            )));
        }
        // The id goes into .sack headers: an absolute path still names the
        // model when `ask` runs from another directory.
        let id = path
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve model directory", path, e))?;
        return resolve_dir(&id.to_string_lossy(), path);
    }
    if looks_like_hub_id(model) && !path.exists() {
        return resolve_hub(model, revision.unwrap_or("main"));
    }
    Err(Error::MissingModelFile(format!(
        "model `{model}` is neither a directory nor a Hugging Face Hub id (owner/name)"
    )))
}

fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

const EXPECTED: &str = "config.json, tokenizer.json, tokenizer_config.json and \
                        model.safetensors or model.safetensors.index.json";

fn resolve_dir(id: &str, dir: &Path) -> Result<ModelFiles> {
    let need = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::MissingModelFile(format!(
                "model directory {} has no `{name}` (a model directory holds {EXPECTED})",
                dir.display()
            )))
        }
    };
    let weights = if dir.join(WEIGHTS_INDEX).is_file() {
        shard_names(&dir.join(WEIGHTS_INDEX))?
            .iter()
            .map(|name| need(name))
            .collect::<Result<_>>()?
    } else {
        vec![need(WEIGHTS)?]
    };
    Ok(ModelFiles {
        id: id.to_string(),
        revision: None,
        config: need(CONFIG)?,
        tokenizer: need(TOKENIZER)?,
        tokenizer_config: need(TOKENIZER_CONFIG)?,
        generation_config: Some(dir.join(GENERATION_CONFIG)).filter(|p| p.is_file()),
        weights,
    })
}

#[derive(Deserialize)]
struct WeightIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The distinct shard files of a sharded checkpoint, in first-use order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| Error::io("cannot read weight index", index, e))?;
    let parsed: WeightIndex = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.to_path_buf(),
        message: format!("not a safetensors index: {e}"),
    })?;
    let mut names: Vec<String> = Vec::new();
    for shard in parsed.weight_map.into_values() {
        if shard.contains(['/', '\\']) || shard.starts_with('.') {
            return Err(Error::Config {
                path: index.to_path_buf(),
                message: format!("shard name `{shard}` is not a plain file name"),
            });
        }
        if !names.contains(&shard) {
            names.push(shard);
        }
    }
    Ok(names)
}

/// The Hub cache in use: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`, as the Python libraries do.
pub fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(dir.into()),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Fetches files of one Hub repository: from the cache when present, else
/// (unless offline) from the network into the cache.
struct HubRepo {
    id: String,
    revision: String,
    cache: Cache,
    api: Option<ApiRepo>,
}

impl HubRepo {
    fn new(id: &str, revision: &str) -> Result<Self> {
        let cache = hub_cache();
        let api = if offline() {
            None
        } else {
            let api = ApiBuilder::from_cache(cache.clone())
                .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_token(std::env::var("HF_TOKEN").ok().or_else(|| cache.token()))
                .build()
                .map_err(|e| {
                    Error::Hub(format!("cannot set up the Hugging Face Hub client: {e}"))
                })?;
            Some(api.repo(Repo::with_revision(
                id.to_string(),
                RepoType::Model,
                revision.to_string(),
            )))
        };
        Ok(HubRepo {
            id: id.to_string(),
            revision: revision.to_string(),
            cache,
            api,
        })
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        let repo = Repo::with_revision(self.id.clone(), RepoType::Model, self.revision.clone());
        // A commit hash has a snapshot directory but no ref file.
        let snapshot = self
            .cache
            .path()
            .join(repo.folder_name())
            .join("snapshots")
            .join(&self.revision)
            .join(file);
        self.cache
            .repo(repo)
            .get(file)
            .or_else(|| snapshot.is_file().then_some(snapshot))
    }

    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(file) {
            return Ok(path);
        }
        let how = format!(
            "fetch it with `huggingface-cli download {} {file} --revision {}` (the cache is {}) \
             or pass --model a local directory",
            self.id,
            self.revision,
            self.cache.path().display()
        );
        match &self.api {
            None => Err(Error::MissingModelFile(format!(
                "`{file}` of {} (revision {}) is not in the Hugging Face cache and \
                 HF_HUB_OFFLINE is set; {how}",
                self.id, self.revision
            ))),
            Some(api) => api.get(file).map_err(|e| {
                Error::MissingModelFile(format!(
                    "cannot get `{file}` of {} (revision {}) from the Hugging Face Hub: {e}; {how}",
                    self.id, self.revision
                ))
            }),
        }
    }

    fn try_get(&self, file: &str) -> Option<PathBuf> {
        self.cached(file)
            .or_else(|| self.api.as_ref().and_then(|api| api.get(file).ok()))
    }
}

fn resolve_hub(id: &str, revision: &str) -> Result<ModelFiles> {
    let repo = HubRepo::new(id, revision)?;
    let config = repo.get(CONFIG)?;
    let weights = match repo.cached(WEIGHTS).or_else(|| repo.try_get(WEIGHTS_INDEX)) {
        Some(index) if index.ends_with(WEIGHTS_INDEX) => shard_names(&index)?
            .iter()
            .map(|name| repo.get(name))
            .collect::<Result<_>>()?,
        Some(single) => vec![single],
        None => vec![repo.get(WEIGHTS)?],
    };
    Ok(ModelFiles {
        id: id.to_string(),
        revision: Some(revision.to_string()),
        config,
        tokenizer: repo.get(TOKENIZER)?,
        tokenizer_config: repo.get(TOKENIZER_CONFIG)?,
        generation_config: repo.try_get(GENERATION_CONFIG),
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, names: &[&str]) {
        for name in names {
            std::fs::write(dir.join(name), "{}").unwrap();
        }
    }

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert!(looks_like_hub_id("meta-llama/Llama-3.2-1B"));
        assert!(looks_like_hub_id("Qwen/Qwen2.5-0.5B"));
        assert!(!looks_like_hub_id("llama"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("./models"));
    }

    #[test]
    fn local_dir_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), &[CONFIG, TOKENIZER_CONFIG, WEIGHTS]);
        let err = resolve(dir.path().to_str().unwrap(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tokenizer.json`"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn sharded_index_resolves_each_shard_once() {
        let dir = tempfile::tempdir().unwrap();
        touch(
            dir.path(),
            &[
                CONFIG,
                TOKENIZER,
                TOKENIZER_CONFIG,
                "a.safetensors",
                "b.safetensors",
            ],
        );
        std::fs::write(
            dir.path().join(WEIGHTS_INDEX),
            r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "a.safetensors"}}"#,
        )
        .unwrap();
        let files = resolve(dir.path().to_str().unwrap(), None).unwrap();
        assert_eq!(files.weights.len(), 2);
        std::fs::write(
            dir.path().join(WEIGHTS_INDEX),
            r#"{"weight_map": {"x": "../evil.safetensors"}}"#,
        )
        .unwrap();
        assert!(resolve(dir.path().to_str().unwrap(), None).is_err());
    }

    #[test]
    fn offline_hub_miss_says_how_to_fetch() {
        let home = tempfile::tempdir().unwrap();
        let repo = HubRepo {
            id: "acme/tiny".into(),
            revision: "main".into(),
            cache: Cache::new(home.path().to_path_buf()),
            api: None,
        };
        let err = repo.get(CONFIG).unwrap_err().to_string();
        assert!(err.contains("`config.json` of acme/tiny"), "{err}");
        assert!(
            err.contains("huggingface-cli download acme/tiny config.json"),
            "{err}"
        );
    }

    #[test]
    fn cached_hub_files_resolve_by_ref_and_by_commit() {
        let home = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo_dir = home.path().join("models--acme--tiny");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::create_dir_all(repo_dir.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
        std::fs::write(repo_dir.join("snapshots").join(commit).join(CONFIG), "{}").unwrap();
        for revision in ["main", commit] {
            let repo = HubRepo {
                id: "acme/tiny".into(),
                revision: revision.into(),
                cache: Cache::new(home.path().to_path_buf()),
                api: None,
            };
            assert!(repo.get(CONFIG).unwrap().ends_with(CONFIG));
        }
    }
}
