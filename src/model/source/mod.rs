//! Where a model's files come from: a local directory, or a Hugging Face Hub
//! repository through hf-hub's cache (`HF_HOME`, `HF_HUB_CACHE`), which is used
//! as is when the files are there, so a cached model needs no network;
//! `HF_HUB_OFFLINE=1` forbids the network altogether.
//!
//! Hub ids and revisions are checked as Hub names before they touch a path:
//! a .sack header names its model, and a name such as `../x` or a revision
//! `/some/dir` must not reach outside the cache.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::config::ConfigError;

mod error;

pub use error::{HubFile, SourceError};

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The files of one model, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named: a Hub id, or the absolute path of the local
    /// directory or file.
    pub id: String,
    /// The Hub revision asked for (`None` for a local model).
    pub revision: Option<String>,
    pub layout: Layout,
}

/// How a model's files are laid out; each layout has its own loader.
#[derive(Debug, Clone)]
pub enum Layout {
    /// A Hugging Face model: `config.json`, tokenizer files, safetensors.
    Hf(HfFiles),
    /// A llama.cpp GGUF file: config, tokenizer and weights in one.
    Gguf(PathBuf),
}

/// The files of a Hugging Face model.
#[derive(Debug, Clone)]
pub struct HfFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: PathBuf,
    pub generation_config: Option<PathBuf>,
    /// One file, or the shards named by the index, in index order.
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// The GGUF file's name in its Hub repository, for a Hub GGUF model.
    pub fn hub_gguf_file(&self) -> Option<String> {
        match (&self.revision, &self.layout) {
            (Some(_), Layout::Gguf(path)) => Some(path.file_name()?.to_string_lossy().into_owned()),
            _ => None,
        }
    }

    /// The files holding the weights.
    pub fn weight_files(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::Hf(hf) => hf.weights.iter().map(PathBuf::as_path).collect(),
            Layout::Gguf(file) => vec![file.as_path()],
        }
    }

    /// Every file the model is read from.
    pub fn paths(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::Hf(hf) => {
                let mut all = vec![
                    hf.config.as_path(),
                    hf.tokenizer.as_path(),
                    hf.tokenizer_config.as_path(),
                ];
                all.extend(hf.generation_config.as_deref());
                all.extend(hf.weights.iter().map(PathBuf::as_path));
                all
            }
            Layout::Gguf(file) => vec![file.as_path()],
        }
    }
}

/// Whether resolving a Hub model may download what the cache lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Download missing files (unless `HF_HUB_OFFLINE` is set): for a model
    /// the user named.
    Allowed,
    /// Use the local cache only: for a model a .sack names.
    CacheOnly,
}

/// Resolves `model` (a directory, a `.gguf` file, or a Hub id such as
/// `meta-llama/Llama-3.2-1B`, with `gguf_file` naming a GGUF file in a Hub
/// repository) as the user named it: a Hub model may be downloaded.
pub fn resolve(model: &str, revision: Option<&str>, gguf_file: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.exists() {
        if revision.is_some() || gguf_file.is_some() {
            return Err(Error::HubOptionsForLocalModel(model.to_string()));
        }
        return resolve_local(path);
    }
    if looks_like_hub_id(model) {
        let revision = revision.unwrap_or("main");
        return resolve_hub(model, revision, gguf_file, Network::Allowed);
    }
    Err(SourceError::Unknown(model.to_string()).into())
}

/// `owner/name` as the Hub spells repository ids: letters, digits, `-`, `_`
/// and `.`, neither part starting or ending with `-` or `.`, no `--` or `..`,
/// at most 96 characters each.
pub fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| p.is_some_and(|p| hub_name_part(p, 96));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// A branch or tag name (no `/`), a 40-digit commit, or `refs/pr/N`.
pub fn looks_like_revision(s: &str) -> bool {
    match s.strip_prefix("refs/pr/") {
        Some(n) => !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()),
        None => hub_name_part(s, 128),
    }
}

fn hub_name_part(p: &str, max_len: usize) -> bool {
    !p.is_empty()
        && p.len() <= max_len
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !p.starts_with(['.', '-'])
        && !p.ends_with(['.', '-'])
        && !p.contains("..")
        && !p.contains("--")
}

/// A GGUF file name in a Hub repository: a plain file name ending in
/// `.gguf`, at most 255 bytes, of the characters Hub names use.
pub fn looks_like_gguf_file(s: &str) -> bool {
    s.len() <= 255
        && s.len() > ".gguf".len()
        && s.to_ascii_lowercase().ends_with(".gguf")
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Refuses a Hub id or revision that is not a Hub name, quoting it escaped.
pub fn check_hub_name(id: &str, revision: &str) -> Result<()> {
    if !looks_like_hub_id(id) {
        return Err(SourceError::NotHubId(id.to_string()).into());
    }
    if !looks_like_revision(revision) {
        return Err(SourceError::NotRevision(revision.to_string()).into());
    }
    Ok(())
}

const EXPECTED: &str = "config.json, tokenizer.json, tokenizer_config.json and \
                        model.safetensors or model.safetensors.index.json";

/// Resolves the local model `path`: a Hugging Face model directory, a
/// `.gguf` file, or a directory holding exactly one `.gguf` file.
pub fn resolve_local(path: &Path) -> Result<ModelFiles> {
    // The id goes into .sack headers: an absolute path still names the
    // model when `ask` runs from another directory.
    let real = path
        .canonicalize()
        .map_err(|e| Error::io("cannot resolve model path", path, e))?;
    let id = real.to_string_lossy().into_owned();
    let gguf = |file: PathBuf| ModelFiles {
        id: file.to_string_lossy().into_owned(),
        revision: None,
        layout: Layout::Gguf(file),
    };
    if real.is_file() {
        if !is_gguf(&real) {
            return Err(SourceError::NotGgufFile(path.to_path_buf()).into());
        }
        return Ok(gguf(real));
    }
    if real.join(CONFIG).is_file() {
        return resolve_dir(&id, path);
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&real)
        .map_err(|e| Error::io("cannot list model directory", path, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf(p))
        .collect();
    ggufs.sort();
    match ggufs.as_slice() {
        [one] => Ok(gguf(one.clone())),
        [] => resolve_dir(&id, path),
        many => Err(SourceError::ManyGgufFiles {
            dir: path.to_path_buf(),
            files: many
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect(),
        }
        .into()),
    }
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn resolve_dir(id: &str, dir: &Path) -> Result<ModelFiles> {
    let need = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(SourceError::NoFile {
                dir: dir.to_path_buf(),
                name: name.to_string(),
            }
            .into())
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
        layout: Layout::Hf(HfFiles {
            config: need(CONFIG)?,
            tokenizer: need(TOKENIZER)?,
            tokenizer_config: need(TOKENIZER_CONFIG)?,
            generation_config: Some(dir.join(GENERATION_CONFIG)).filter(|p| p.is_file()),
            weights,
        }),
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
    let parsed: WeightIndex =
        serde_json::from_str(&text).map_err(|e| ConfigError::NotIndex(e).at(index))?;
    let mut names: Vec<String> = Vec::new();
    for shard in parsed.weight_map.into_values() {
        if shard.is_empty() || shard.contains(['/', '\\']) || shard.starts_with('.') {
            return Err(ConfigError::ShardName(shard).at(index));
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
/// (when allowed) from the network into the cache.
struct HubRepo {
    id: String,
    revision: String,
    cache: Cache,
    reach: Reach,
}

/// Where files the cache lacks can come from.
enum Reach {
    Hub(Box<ApiRepo>),
    /// `HF_HUB_OFFLINE` is set.
    Offline,
    /// [`Network::CacheOnly`].
    CacheOnly,
}

impl HubRepo {
    fn new(cache: &Cache, id: &str, revision: &str, network: Network) -> Result<Self> {
        check_hub_name(id, revision)?;
        let cache = cache.clone();
        let reach = if network == Network::CacheOnly {
            Reach::CacheOnly
        } else if offline() {
            Reach::Offline
        } else {
            let mut builder = ApiBuilder::from_cache(cache.clone());
            // A mirror, as the Python libraries read it.
            if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
                builder = builder.with_endpoint(endpoint);
            }
            let api = builder
                .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_token(std::env::var("HF_TOKEN").ok().or_else(|| cache.token()))
                .build()
                .map_err(SourceError::HubClient)?;
            Reach::Hub(Box::new(api.repo(Repo::with_revision(
                id.to_string(),
                RepoType::Model,
                revision.to_string(),
            ))))
        };
        Ok(HubRepo {
            id: id.to_string(),
            revision: revision.to_string(),
            cache,
            reach,
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
        let hub_file = HubFile {
            id: self.id.clone(),
            revision: self.revision.clone(),
            file: file.to_string(),
            cache: self.cache.path().clone(),
        };
        match &self.reach {
            Reach::CacheOnly => Err(Error::NotCached {
                id: hub_file.id,
                revision: hub_file.revision,
                file: hub_file.file,
                cache: hub_file.cache,
            }),
            Reach::Offline => Err(SourceError::Offline(Box::new(hub_file)).into()),
            Reach::Hub(api) => api.get(file).map_err(|source| {
                SourceError::Fetch {
                    file: Box::new(hub_file),
                    source,
                }
                .into()
            }),
        }
    }

    fn try_get(&self, file: &str) -> Option<PathBuf> {
        self.cached(file).or_else(|| match &self.reach {
            Reach::Hub(api) => api.get(file).ok(),
            Reach::Offline | Reach::CacheOnly => None,
        })
    }
}

/// Resolves Hub model `id` at `revision` in the user's cache (its GGUF file
/// `gguf_file`, if given), downloading what it lacks only if `network`
/// allows it.
pub fn resolve_hub(
    id: &str,
    revision: &str,
    gguf_file: Option<&str>,
    network: Network,
) -> Result<ModelFiles> {
    resolve_hub_in(&hub_cache(), id, revision, gguf_file, network)
}

/// [`resolve_hub`] with the Hub cache `cache`.
pub fn resolve_hub_in(
    cache: &Cache,
    id: &str,
    revision: &str,
    gguf_file: Option<&str>,
    network: Network,
) -> Result<ModelFiles> {
    let repo = HubRepo::new(cache, id, revision, network)?;
    if let Some(name) = gguf_file {
        if !looks_like_gguf_file(name) {
            return Err(SourceError::NotGgufName(name.to_string()).into());
        }
        return Ok(ModelFiles {
            id: id.to_string(),
            revision: Some(revision.to_string()),
            layout: Layout::Gguf(repo.get(name)?),
        });
    }
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
        layout: Layout::Hf(HfFiles {
            config,
            tokenizer: repo.get(TOKENIZER)?,
            tokenizer_config: repo.get(TOKENIZER_CONFIG)?,
            generation_config: repo.try_get(GENERATION_CONFIG),
            weights,
        }),
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
        assert!(!looks_like_hub_id("a/.."));
        assert!(!looks_like_hub_id("/etc/passwd"));
        assert!(!looks_like_hub_id("a--b/c"));
        assert!(looks_like_revision("main"));
        assert!(looks_like_revision("v1.0"));
        assert!(looks_like_revision(&"a".repeat(40)));
        assert!(looks_like_revision("refs/pr/12"));
        for bad in [
            "",
            "/some/dir",
            "..",
            "a/b",
            "refs/pr/x",
            "../main",
            "main\\x",
        ] {
            assert!(!looks_like_revision(bad), "{bad}");
        }
    }

    #[test]
    fn cache_only_miss_is_not_cached_and_never_downloads() {
        let home = tempfile::tempdir().unwrap();
        let repo = HubRepo {
            id: "acme/tiny".into(),
            revision: "main".into(),
            cache: Cache::new(home.path().to_path_buf()),
            reach: Reach::CacheOnly,
        };
        assert!(matches!(repo.get(CONFIG), Err(Error::NotCached { .. })));
        assert!(repo.try_get(GENERATION_CONFIG).is_none());
    }

    #[test]
    fn bad_revisions_are_refused_before_any_path_is_built() {
        let err = resolve_hub("acme/tiny", "/some/dir", None, Network::CacheOnly).unwrap_err();
        assert!(
            matches!(err, Error::Source(SourceError::NotRevision(_))),
            "{err}"
        );
        let err = resolve_hub("../x", "main", None, Network::CacheOnly).unwrap_err();
        assert!(
            matches!(err, Error::Source(SourceError::NotHubId(_))),
            "{err}"
        );
        for name in ["../x.gguf", "/etc/x.gguf", "a/b.gguf", "x.bin", ".gguf"] {
            assert!(!looks_like_gguf_file(name), "{name}");
            let err = resolve_hub("acme/tiny", "main", Some(name), Network::CacheOnly);
            assert!(
                matches!(err, Err(Error::Source(SourceError::NotGgufName(_)))),
                "{name}"
            );
        }
        assert!(looks_like_gguf_file("SmolLM2-135M-Instruct.Q4_1.gguf"));
    }

    #[test]
    fn local_dir_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), &[CONFIG, TOKENIZER_CONFIG, WEIGHTS]);
        let err = resolve(dir.path().to_str().unwrap(), None, None)
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
        let files = resolve(dir.path().to_str().unwrap(), None, None).unwrap();
        assert_eq!(files.weight_files().len(), 2);
        std::fs::write(
            dir.path().join(WEIGHTS_INDEX),
            r#"{"weight_map": {"x": "../evil.safetensors"}}"#,
        )
        .unwrap();
        assert!(resolve(dir.path().to_str().unwrap(), None, None).is_err());
    }

    #[test]
    fn offline_hub_miss_says_how_to_fetch() {
        let home = tempfile::tempdir().unwrap();
        let repo = HubRepo {
            id: "acme/tiny".into(),
            revision: "main".into(),
            cache: Cache::new(home.path().to_path_buf()),
            reach: Reach::Offline,
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
                reach: Reach::CacheOnly,
            };
            assert!(repo.get(CONFIG).unwrap().ends_with(CONFIG));
        }
    }
}
