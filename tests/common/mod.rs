//! Fixtures and helpers shared by the integration tests; each test crate uses
//! a different subset of them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sac::model::{self, Decoder, ModelConfig};

pub mod stacked;
pub mod train;

/// The block of positions that the `bidir` reference case makes bidirectional.
pub const BIDIRECTIONAL_BLOCK: std::ops::Range<usize> = 3..11;

/// The fixture models made by `scripts/make_fixtures.py`.
pub const PARITY_MODELS: [&str; 4] = ["llama3", "qwen2", "qwen3", "mistral"];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

pub struct Fixture {
    pub decoder: Decoder,
    pub reference: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn load(name: &str, dtype: DType) -> Fixture {
        let dir = fixture_dir(name);
        let files = model::source::resolve(dir.to_str().unwrap(), None, None).unwrap();
        let model::Layout::Hf(files) = files.layout else {
            panic!("{name} is not a Hugging Face model directory")
        };
        let config = ModelConfig::from_file(&files.config).unwrap();
        let decoder = model::load_decoder(&files, config, &Device::Cpu, dtype, false).unwrap();
        let reference =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        Fixture { decoder, reference }
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("reference has no `{name}`"))
    }

    /// A reference id tensor as `[1, n]` u32.
    pub fn ids(&self, name: &str) -> Tensor {
        self.tensor(name)
            .to_dtype(DType::U32)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    }
}

/// One causal pass of `model` over `ids` at positions `first_position..`.
pub fn causal_pass(
    model: &sac::runtime::LoadedModel,
    ids: &[u32],
    first_position: u32,
) -> sac::model::ForwardOutput {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions = Tensor::arange(
        first_position,
        first_position + ids.len() as u32,
        &Device::Cpu,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let embeds = model.decoder.embed(&input).unwrap();
    model
        .decoder
        .forward(sac::model::ForwardInput::causal(&embeds, &positions))
        .unwrap()
}

/// The logits `[1, n, vocab]` of [`causal_pass`].
pub fn causal_logits(
    model: &sac::runtime::LoadedModel,
    ids: &[u32],
    first_position: u32,
) -> Tensor {
    let out = causal_pass(model, ids, first_position);
    model.decoder.logits(&out.hidden).unwrap()
}

/// max |t| over all elements, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// max |a - b| over all elements, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    max_abs(&(a - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// The `sac` binary with a private fingerprint cache and no network.
pub fn sac() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sac"));
    cmd.env("SAC_CACHE_DIR", std::env::temp_dir().join("sac-test-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SAC_MODEL");
    cmd
}

/// The files of a model directory.
pub const MODEL_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];

/// Lays out the fixture model `mistral` as Hub model `acme/tiny` in a Hub
/// cache under `home`, as huggingface_hub does: blobs named by content,
/// snapshot entries that link to them, a ref `reference` naming the snapshot.
pub fn hub_cache(home: &std::path::Path, reference: &str) {
    let repo = home.join("hub/models--acme--tiny");
    let commit = "a".repeat(40);
    let snapshot = repo.join("snapshots").join(&commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(reference), &commit).unwrap();
    let src = fixture_dir("mistral");
    for name in MODEL_FILES {
        let blob = repo.join("blobs").join(format!("{:0>64}", name.len()));
        std::fs::copy(src.join(name), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
    }
}

/// `sac` offline against the Hub cache under `home`, with its own sac cache
/// there too.
pub fn sac_offline(home: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sac"));
    command
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .env("SAC_CACHE_DIR", home.join("sac"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("SAC_MODEL");
    command
}

/// `cmd` (a `sac` command with its environment) compresses `doc` with
/// `model` into `out`, quietly, with `flags`.
pub fn compress(
    mut cmd: std::process::Command,
    doc: &std::path::Path,
    model: impl AsRef<std::ffi::OsStr>,
    flags: &[&str],
    out: &std::path::Path,
) {
    run_ok(
        cmd.arg("compress")
            .arg(doc)
            .arg("-m")
            .arg(model)
            .args(flags)
            .args(["-q", "-o"])
            .arg(out),
    );
}

/// [`compress`] of `tests/fixtures/sac/doc_edge.txt` with `compressor`.
pub fn compress_edge(
    cmd: std::process::Command,
    model: impl AsRef<std::ffi::OsStr>,
    compressor: &str,
    out: &std::path::Path,
) {
    let doc = sac_fixture("doc_edge.txt");
    compress(cmd, &doc, model, &["--compressor", compressor], out);
}

/// Token ids as `--json` prints them (`"tokens": [...]`) or a fixture
/// stores them.
pub fn json_ids(ids: &serde_json::Value) -> Vec<u32> {
    ids.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

/// Runs `cmd`, panicking with its stderr unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().expect("run sac");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `cmd`, which must fail with one line on stderr; returns that line.
pub fn failing(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    err
}

/// The directory of the SAC reference fixtures.
pub fn sac_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sac")
        .join(name)
}

/// A parity fixture model loaded for the CPU in f32.
pub fn load_model(name: &str) -> sac::runtime::LoadedModel {
    load_model_at(&fixture_dir(name))
}

/// The model at `path` loaded for the CPU in f32.
pub fn load_model_at(path: &std::path::Path) -> sac::runtime::LoadedModel {
    load_model_in(path, sac::device::DTypeSpec::F32)
}

/// The model at `path` loaded for inference on the CPU in `dtype`.
pub fn load_model_in(
    path: &std::path::Path,
    dtype: sac::device::DTypeSpec,
) -> sac::runtime::LoadedModel {
    sac::runtime::LoadedModel::load(&sac::runtime::ModelSpec {
        model: path.to_string_lossy().into_owned(),
        revision: None,
        gguf_file: None,
        device: sac::device::DeviceSpec::Cpu,
        dtype,
        workload: sac::device::Workload::Inference,
    })
    .unwrap()
}

/// A causal mask over `seq` tokens (no past) in which every token of each block
/// in `blocks` also sees every other token of that block.
pub fn causal_with_bidirectional_blocks(
    seq: usize,
    blocks: &[std::ops::Range<usize>],
    device: &Device,
) -> sac::Result<Tensor> {
    if let Some(bad) = blocks.iter().find(|b| b.end > seq) {
        return Err(candle_core::Error::Msg(format!(
            "block {bad:?} reaches past the {seq} tokens"
        ))
        .into());
    }
    model::mask::additive_from_fn(seq, seq, device, |i, j| {
        j <= i || blocks.iter().any(|b| b.contains(&i) && b.contains(&j))
    })
}

/// `var`'s gradient in `grads`, flattened, in f64; `what` names it if none
/// reached it.
pub fn gradient(
    grads: &candle_core::backprop::GradStore,
    var: &candle_core::Var,
    what: &str,
) -> Vec<f64> {
    grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{what}"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Checks `analytic`, the gradient of `loss` (in f64) for `var`, at a few
/// elements against central finite differences; `var` is left as it was.
pub fn check_gradient(
    what: &str,
    var: &candle_core::Var,
    analytic: &[f64],
    loss: impl Fn() -> f64,
) {
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let n = original.len();
    for idx in [0, n / 3, n / 2, n - 1] {
        let eps = 1e-6;
        let at = |delta: f64| {
            let mut x = original.clone();
            x[idx] += delta;
            var.set(&Tensor::from_vec(x, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let g = analytic[idx];
        assert!(
            (g - numeric).abs() <= 1e-6 + 1e-5 * g.abs().max(numeric.abs()),
            "{what}[{idx}]: backprop {g}, finite difference {numeric}"
        );
    }
}

/// The decoder's past read from a .sack whose header names no adapter
/// (checked, as `sac ask` checks it).
pub fn load_context<R: std::io::Read + std::io::Seek>(
    reader: &mut sac::sack::SackReader<R>,
    decoder: &Decoder,
) -> sac::generate::DecoderContext {
    let adapter = sac::from_sack::check_adapter(reader.header(), reader.file_name(), None).unwrap();
    sac::from_sack::load_context(reader, decoder, adapter).unwrap()
}
