//! GGUF models: the fixture models written as llama.cpp's converter writes
//! them (query and key rows permuted for Llama, tensors quantized by candle),
//! loaded back through `--model FILE.gguf`, must run as their safetensors do;
//! damaged or unsupported files give one clear line.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{compress_edge, fixture_dir, max_abs_diff, run_ok, sac, sac_fixture};
use sac::runtime::{LoadedModel, ModelSpec};

/// llama.cpp's converter for a config with Llama 3.1's RoPE scaling: one
/// divisor per rotation pair, stored as the tensor `rope_freqs.weight`.
fn llama3_rope_factors(config: &serde_json::Value) -> Option<Vec<f32>> {
    let scaling = &config["rope_scaling"];
    if scaling["rope_type"] != "llama3" {
        return None;
    }
    let f = |key: &str| scaling[key].as_f64().unwrap();
    let (factor, low, high, old) = (
        f("factor"),
        f("low_freq_factor"),
        f("high_freq_factor"),
        f("original_max_position_embeddings"),
    );
    let dim = config["head_dim"].as_u64().unwrap() as usize;
    let base = config["rope_theta"].as_f64().unwrap();
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    Some(
        (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let divisor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                divisor as f32
            })
            .collect(),
    )
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let global = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = global.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let part = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

/// llama.cpp's permutation of query and key rows.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes fixture model `name` (architecture `arch`) as a GGUF file in `dir`,
/// matrices in `dtype` (norms and biases stay f32, as llama.cpp keeps them).
fn write_gguf(name: &str, arch: &str, dtype: GgmlDType, dir: &Path) -> PathBuf {
    write_gguf_of(&fixture_dir(name), arch, dtype, dir)
}

/// [`write_gguf`] of the model directory `src`.
fn write_gguf_of(src: &Path, arch: &str, dtype: GgmlDType, dir: &Path) -> PathBuf {
    let name = src.file_name().unwrap().to_string_lossy();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let n = |key: &str| config[key].as_u64().unwrap() as u32;
    let heads = n("num_attention_heads") as usize;
    let kv_heads = n("num_key_value_heads") as usize;

    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); n("vocab_size") as usize];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for added in tokenizer["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap() as usize;
        tokens[id] = added["content"].as_str().unwrap().to_string();
        types[id] = 3;
    }
    let merges: Vec<Value> = tokenizer["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            pair => Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )),
        })
        .collect();
    let key = |k: &str| format!("{arch}.{k}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(n("num_hidden_layers"))),
        (
            key("context_length"),
            Value::U32(n("max_position_embeddings")),
        ),
        (key("embedding_length"), Value::U32(n("hidden_size"))),
        (
            key("feed_forward_length"),
            Value::U32(n("intermediate_size")),
        ),
        (key("attention.head_count"), Value::U32(heads as u32)),
        (key("attention.head_count_kv"), Value::U32(kv_heads as u32)),
        (
            key("attention.key_length"),
            Value::U32(
                config["head_dim"]
                    .as_u64()
                    .map_or(n("hidden_size") / heads as u32, |d| d as u32),
            ),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(config["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            key("rope.freq_base"),
            Value::F32(config["rope_theta"].as_f64().unwrap() as f32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(n("bos_token_id")),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(n("eos_token_id")),
        ),
    ];

    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let permuted = arch == "llama";
    let mut tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(hf, t)| {
            let t = match (permuted, hf) {
                (true, h) if h.ends_with("q_proj.weight") => permute(t, heads),
                (true, h) if h.ends_with("k_proj.weight") => permute(t, kv_heads),
                _ => t.clone(),
            };
            let kind = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
            (gguf_name(hf), QTensor::quantize(&t, kind).unwrap())
        })
        .collect();
    if let Some(factors) = llama3_rope_factors(&config) {
        let t = Tensor::new(factors, &Device::Cpu).unwrap();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let path = dir.join(format!("{name}-{dtype:?}.gguf"));
    let mut file = std::fs::File::create(&path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    path
}

fn load(model: &Path) -> LoadedModel {
    LoadedModel::load(&ModelSpec {
        model: model.to_string_lossy().into_owned(),
        revision: None,
        gguf_file: None,
        device: sac::device::DeviceSpec::Cpu,
        dtype: sac::device::DTypeSpec::F32,
        workload: sac::device::Workload::Inference,
    })
    .unwrap()
}

/// Logits of the context ids of `text` under `model`.
fn logits(model: &LoadedModel, text: &str) -> (Vec<u32>, Tensor) {
    let ids = model.tokenizer.context_ids(text).unwrap();
    let logits = common::causal_logits(model, &ids, 1);
    (ids, logits)
}

#[test]
fn a_gguf_runs_as_its_safetensors_do() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sac_fixture("doc_edge.txt")).unwrap();
    // llama.cpp converts Mistral models as "llama"; the llama3 fixture scales
    // RoPE by Llama 3.1's rule, which GGUF stores as the tensor rope_freqs.
    for (name, arch) in [
        ("llama3", "llama"),
        ("mistral", "llama"),
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
    ] {
        let hf = load(&fixture_dir(name));
        let (hf_ids, hf_logits) = logits(&hf, &text);
        let gguf = load(&write_gguf(name, arch, GgmlDType::F32, dir.path()));
        assert_eq!(gguf.config.num_layers, hf.config.num_layers);
        assert_eq!(gguf.tokenizer.eos(), hf.tokenizer.eos(), "{name}");
        let (ids, gguf_logits) = logits(&gguf, &text);
        assert_eq!(ids, hf_ids, "{name}: token ids");
        let diff = max_abs_diff(&gguf_logits, &hf_logits);
        assert!(diff < 1e-4, "{name}: f32 GGUF logits differ by {diff}");
        // Quantized, the same model stays close, relative to the logits' range.
        let range = max_abs_diff(&hf_logits, &hf_logits.zeros_like().unwrap());
        for (dtype, bound) in [(GgmlDType::Q8_0, 0.02), (GgmlDType::Q4_1, 0.2)] {
            let q = load(&write_gguf(name, arch, dtype, dir.path()));
            let diff = max_abs_diff(&logits(&q, &text).1, &hf_logits) / range;
            assert!(
                diff < bound,
                "{name} {dtype:?}: logits differ by {diff} of their range"
            );
        }
    }
}

/// The mistral fixture widened to 256 (the k-quants' block), with seeded
/// random weights of its initializer's scale, as a model directory in `dir`.
fn wide_model(dir: &Path) -> PathBuf {
    let src = fixture_dir("mistral");
    let out = dir.join("wide");
    std::fs::create_dir_all(&out).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(file), out.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = 256.into();
    config["intermediate_size"] = 512.into();
    config["head_dim"] = 64.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let (h, i, v, q, kv) = (256, 512, 300, 4 * 64, 2 * 64);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("lm_head.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..2 {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        shapes.extend([
            (p("input_layernorm.weight"), vec![h]),
            (p("post_attention_layernorm.weight"), vec![h]),
            (p("self_attn.q_proj.weight"), vec![q, h]),
            (p("self_attn.k_proj.weight"), vec![kv, h]),
            (p("self_attn.v_proj.weight"), vec![kv, h]),
            (p("self_attn.o_proj.weight"), vec![h, q]),
            (p("mlp.gate_proj.weight"), vec![i, h]),
            (p("mlp.up_proj.weight"), vec![i, h]),
            (p("mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    // splitmix64: the same weights on every run.
    let mut state = 7u64;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let tensors: std::collections::HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n).map(|_| uniform() * 0.2).collect()
            };
            (name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    out
}

/// Every quantization type the issue names loads through candle's
/// dequantizers, and runs close to the f32 weights it was made from.
#[test]
fn every_common_quantization_type_loads() {
    let dir = tempfile::tempdir().unwrap();
    let src = wide_model(dir.path());
    let text = std::fs::read_to_string(sac_fixture("doc_edge.txt")).unwrap();
    let (_, reference) = logits(&load(&src), &text);
    let f32_gguf = load(&write_gguf_of(&src, "llama", GgmlDType::F32, dir.path()));
    assert!(max_abs_diff(&logits(&f32_gguf, &text).1, &reference) < 1e-4);
    let range = max_abs_diff(&reference, &reference.zeros_like().unwrap());
    for (dtype, bound) in [
        (GgmlDType::F16, 0.01),
        (GgmlDType::BF16, 0.05),
        (GgmlDType::Q8_0, 0.05),
        (GgmlDType::Q6K, 0.1),
        (GgmlDType::Q5K, 0.2),
        (GgmlDType::Q4K, 0.3),
        (GgmlDType::Q4_0, 0.6),
        (GgmlDType::Q4_1, 0.6),
    ] {
        let q = load(&write_gguf_of(&src, "llama", dtype, dir.path()));
        let diff = max_abs_diff(&logits(&q, &text).1, &reference) / range;
        assert!(
            diff < bound,
            "{dtype:?}: logits differ by {diff} of their range"
        );
    }
}

#[test]
fn a_gguf_compresses_and_answers_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_gguf("mistral", "llama", GgmlDType::Q8_0, dir.path());
    let sack = dir.path().join("d.sack");
    compress_edge(sac(), &gguf, "kvzip", &sack);
    // No --model: the .gguf was named on a command line before.
    let out = run_ok(
        sac()
            .arg("ask")
            .arg(&sack)
            .args(["Q?", "--max-tokens", "3", "--json"]),
    );
    let answer: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(answer["tokens"].as_array().unwrap().len(), 3);
    // A directory holding exactly one .gguf is that model.
    let info = run_ok(
        sac()
            .arg("model-info")
            .arg("-m")
            .arg(dir.path())
            .arg("--json"),
    );
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["architecture"], "llama");
    let hash = sha256_hex(&std::fs::read(&gguf).unwrap());
    assert_eq!(info["fingerprint"]["model"], format!("sha256:{hash}"));
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn bad_gguf_files_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(write_gguf("mistral", "llama", GgmlDType::Q8_0, dir.path())).unwrap();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated-header.gguf",
            good[..200].to_vec(),
            "not a GGUF file sac can read",
        ),
        (
            "truncated-data.gguf",
            good[..good.len() - 100].to_vec(),
            "tensor",
        ),
        ("empty.gguf", Vec::new(), "not a GGUF file sac can read"),
    ];
    // Another architecture: the string "llama" after its key, renamed.
    let key = b"general.architecture";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let mut other = good.clone();
    let value = at + 4 + 8;
    other[value..value + 5].copy_from_slice(b"gpt-j");
    cases.push((
        "other-arch.gguf",
        other,
        "architecture \"gpt-j\" is not supported",
    ));
    // A quantization type candle does not know (ggml type 1000).
    let tensor = b"blk.0.attn_k.weight";
    let at = good
        .windows(tensor.len())
        .position(|w| w == tensor)
        .unwrap()
        + tensor.len();
    let dims = u32::from_le_bytes(good[at..at + 4].try_into().unwrap()) as usize;
    let mut unknown = good.clone();
    let dtype = at + 4 + 8 * dims;
    unknown[dtype..dtype + 4].copy_from_slice(&1000u32.to_le_bytes());
    cases.push(("unknown-type.gguf", unknown, "dtype"));
    for (name, bytes, why) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = sac()
            .arg("compress")
            .arg(sac_fixture("doc_edge.txt"))
            .arg("-m")
            .arg(&path)
            .arg("-o")
            .arg(dir.path().join("x.sack"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
    }
}

#[test]
fn a_gguf_file_of_a_hub_repository_is_named_with_gguf_file() {
    let home = tempfile::tempdir().unwrap();
    let gguf = write_gguf("mistral", "llama", GgmlDType::Q8_0, home.path());
    let bytes = std::fs::read(&gguf).unwrap();
    let sha = sha256_hex(&bytes);
    // The Hub cache layout: a blob named by its SHA-256, a snapshot link, a ref.
    let repo = home.path().join("hub/models--acme--tiny-gguf");
    let snapshot = repo.join("snapshots").join("b".repeat(40));
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "b".repeat(40)).unwrap();
    std::fs::write(repo.join("blobs").join(&sha), &bytes).unwrap();
    std::os::unix::fs::symlink(
        repo.join("blobs").join(&sha),
        snapshot.join("tiny.Q8_0.gguf"),
    )
    .unwrap();
    let named = ["-m", "acme/tiny-gguf", "--gguf-file", "tiny.Q8_0.gguf"];

    let info = run_ok(
        common::sac_offline(home.path())
            .arg("model-info")
            .args(named)
            .arg("--json"),
    );
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["fingerprint"]["model"], format!("sha256:{sha}"));
    let sack = home.path().join("d.sack");
    let flags = ["--gguf-file", "tiny.Q8_0.gguf", "--compressor", "uniform"];
    let doc = sac_fixture("doc_edge.txt");
    common::compress(
        common::sac_offline(home.path()),
        &doc,
        "acme/tiny-gguf",
        &flags,
        &sack,
    );
    let text = run_ok(common::sac_offline(home.path()).arg("info").arg(&sack));
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("acme/tiny-gguf at revision main, file tiny.Q8_0.gguf"),
        "{text}"
    );
    // The header names the file: ask finds it in the cache, and only there.
    run_ok(
        common::sac_offline(home.path())
            .arg("ask")
            .arg(&sack)
            .args(["Q?", "--max-tokens", "2"]),
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let err = common::failing(
        common::sac_offline(elsewhere.path())
            .arg("ask")
            .arg(&sack)
            .arg("Q?"),
    );
    assert!(
        err.contains("huggingface-cli download acme/tiny-gguf tiny.Q8_0.gguf --revision main"),
        "{err}"
    );
}

/// A SentencePiece ("llama") vocabulary tokenizes as SentencePiece itself
/// does (scripts/make_spm_fixture.py: a tiny BPE vocabulary with byte
/// fallback and Llama's normalization, none).
#[test]
fn a_sentencepiece_vocabulary_tokenizes_as_sentencepiece() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tokenizer = sac::model::gguf::GgufModel::open(&dir.join("vocab.gguf"))
        .unwrap()
        .tokenizer()
        .unwrap();
    assert_eq!(tokenizer.bos(), reference["bos"].as_u64().map(|b| b as u32));
    assert!(
        tokenizer
            .eos()
            .contains(&(reference["eos"].as_u64().unwrap() as u32))
    );
    for case in reference["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = common::json_ids(&case["ids"]);
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected, "{text:?}");
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}
