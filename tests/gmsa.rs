//! GMSA against HF transformers + PEFT following the official code
//! (tests/fixtures/gmsa, made by scripts/make_gmsa_fixtures.py): the pooled
//! vectors, the soft tokens, and the decoder's logits over the soft tokens
//! and a question, and the loss of an autoencoding step, in f32; with a
//! stage-2 decoder LoRA, the decoder's logits, the first token `ask`
//! generates, and the loss of a qa step; the gradients of the autoencoding
//! loss (encoder LoRA, alignment block, decoder LoRA) against finite
//! differences in f64; then a GMSA .sack through the
//! binary: compress, info, ask (one question, a batch, a pipe).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use sac::adapter::gmsa::GmsaAdapter;
use sac::compress::gmsa::{group_merge, soft_tokens};
use sac::from_sack::soft_past;
use sac::generate::{Answerer, SamplingSettings};
use sac::layout::prompt::PromptLayout;
use sac::model::{self as model_, Decoder, ForwardInput, Kernels, ModelLora};
use sac::train::data::Sample;
use sac::train::gmsa::sample_loss;

use common::{failing, json_ids, load_model_at, max_abs_diff, run_ok, sac};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gmsa")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The fixture `name`'s model, adapter and reference, in f32.
fn loaded(
    name: &str,
) -> (
    sac::runtime::LoadedModel,
    GmsaAdapter,
    HashMap<String, Tensor>,
) {
    loaded_with(name, "adapter")
}

/// [`loaded`] with the adapter in the fixture's directory `adapter`.
fn loaded_with(
    name: &str,
    adapter: &str,
) -> (
    sac::runtime::LoadedModel,
    GmsaAdapter,
    HashMap<String, Tensor>,
) {
    let m = load_model_at(&fixture(name).join("model"));
    let adapter = GmsaAdapter::load(
        &fixture(name).join(adapter),
        &m.config,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    (m, adapter, reference(name))
}

/// The decoder's last hidden states `[1, m + n, hidden]` reading the soft
/// tokens `[m, hidden]`, then `ids`, at positions 0.. without a gap, with
/// `lora` (a stage-2 decoder LoRA) if given.
fn read_after_soft(
    decoder: &Decoder,
    soft: &Tensor,
    ids: &[u32],
    lora: Option<&ModelLora>,
) -> Tensor {
    let ids = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let embeds = Tensor::cat(
        &[soft.unsqueeze(0).unwrap(), decoder.embed(&ids).unwrap()],
        1,
    )
    .unwrap();
    let len = embeds.dim(1).unwrap() as u32;
    let positions = Tensor::arange(0u32, len, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    decoder
        .forward(ForwardInput {
            lora,
            ..ForwardInput::causal(&embeds, &positions)
        })
        .unwrap()
        .hidden
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

#[test]
fn soft_tokens_and_logits_match_transformers_and_peft() {
    for name in ["llama3", "qwen2"] {
        let (m, adapter, r) = loaded(name);
        let merge = adapter.config.merge_size;
        let pooled = group_merge(&r["encoder_hidden"], merge).unwrap();
        assert!(
            max_abs_diff(&pooled, &r["pooled"]) <= 1e-6,
            "{name}: pooling"
        );

        let context = ids(&r["context_ids"]);
        let soft = soft_tokens(&m.decoder, &adapter, &context, Kernels::Inference).unwrap();
        assert_eq!(soft.dims(), r["soft_tokens"].dims(), "{name}");
        let d = max_abs_diff(&soft, &r["soft_tokens"]);
        assert!(d <= TOLERANCE, "{name}: soft tokens differ by {d}");

        let hidden = read_after_soft(&m.decoder, &soft, &ids(&r["question_ids"]), None);
        let logits = m.decoder.logits(&hidden.squeeze(0).unwrap()).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= TOLERANCE, "{name}: logits differ by {d}");
    }
}

#[test]
fn a_stage_two_decoder_lora_matches_peft_in_logits_answer_and_loss() {
    for name in ["llama3", "qwen2"] {
        let (m, adapter, r) = loaded_with(name, "adapter_stage2");
        let lora = adapter.decoder_lora.clone().expect("a decoder LoRA");
        let (context, question) = (ids(&r["context_ids"]), ids(&r["question_ids"]));
        let soft = soft_tokens(&m.decoder, &adapter, &context, Kernels::Inference).unwrap();
        let d = max_abs_diff(&soft, &r["soft_tokens"]);
        assert!(d <= TOLERANCE, "{name}: soft tokens differ by {d}");

        let hidden = read_after_soft(&m.decoder, &soft, &question, Some(&lora));
        let logits = m.decoder.logits(&hidden.squeeze(0).unwrap()).unwrap();
        let d = max_abs_diff(&logits, &r["qa_logits"]);
        assert!(
            d <= TOLERANCE,
            "{name}: logits with the decoder LoRA differ by {d}"
        );

        // `ask`'s path: the decoder's past over the soft tokens, then the
        // question, both through the LoRA.
        let context = soft_past(&m.decoder, &soft, 0, Some(lora)).unwrap();
        let answerer = Answerer::new(&m.decoder, context, &[]).unwrap();
        let sampling = SamplingSettings {
            temperature: 0.0,
            top_p: None,
            seed: 0,
            max_tokens: 1,
        };
        let first = answerer.answer(&question, &sampling, |_| Ok(true)).unwrap();
        let last = r["qa_logits"]
            .get(r["qa_logits"].dim(0).unwrap() - 1)
            .unwrap();
        let expected = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(first.tokens, [expected], "{name}: ask's first token");

        let sample = Sample {
            context: ids(&r["context_ids"]),
            prompt: question,
            target: ids(&r["answer_ids"]),
        };
        let loss = sample_loss(&m.decoder, &adapter, &sample, Kernels::Training)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let expected = r["qa_loss"].to_vec1::<f32>().unwrap()[0];
        assert!(
            (loss - expected).abs() <= TOLERANCE,
            "{name}: qa loss {loss}, transformers + PEFT {expected}"
        );
    }
}

fn autoencode_sample(r: &HashMap<String, Tensor>) -> Sample {
    Sample {
        context: ids(&r["context_ids"]),
        prompt: ids(&r["restate_ids"]),
        target: ids(&r["target_ids"]),
    }
}

#[test]
fn an_autoencoding_loss_matches_transformers() {
    for name in ["llama3", "qwen2"] {
        let (m, adapter, r) = loaded(name);
        let loss = sample_loss(
            &m.decoder,
            &adapter,
            &autoencode_sample(&r),
            Kernels::Training,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let expected = r["autoencode_loss"].to_vec1::<f32>().unwrap()[0];
        assert!(
            (loss - expected).abs() <= TOLERANCE,
            "{name}: loss {loss}, transformers {expected}"
        );
    }
}

/// Through the stage-2 adapter, so that the gradients of the encoder's
/// LoRA, the alignment block and the decoder's LoRA are all checked.
#[test]
fn the_training_gradients_match_finite_differences() {
    let dir = fixture("qwen2");
    let files = model_::source::resolve(dir.join("model").to_str().unwrap(), None, None).unwrap();
    let model_::Layout::Hf(files) = files.layout else {
        panic!("a Hugging Face model directory")
    };
    let config = model_::ModelConfig::from_file(&files.config).unwrap();
    let decoder =
        model_::load_decoder(&files, config.clone(), &Device::Cpu, DType::F64, false).unwrap();
    let stored = candle_core::safetensors::load(
        dir.join("adapter_stage2").join("adapter.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let vars: Vec<(String, Var)> = stored
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap(),
            )
        })
        .collect();
    let gmsa_config = sac::adapter::GmsaConfig::load(&dir.join("adapter_stage2")).unwrap();
    let mut sample = autoencode_sample(&reference("qwen2"));
    sample.context.truncate(10);
    sample.target = sample.context.clone();
    let loss = || {
        let tensors = vars
            .iter()
            .map(|(name, v)| (name.clone(), v.as_tensor().clone()))
            .collect();
        let adapter =
            GmsaAdapter::from_tensors(gmsa_config.clone(), tensors, &config, DType::F64).unwrap();
        sample_loss(&decoder, &adapter, &sample, Kernels::Training).unwrap()
    };
    let grads = loss().backward().unwrap();
    for trainable in [
        "encoder.layers.0.self_attn.q_proj.lora_b",
        "encoder.layers.1.mlp.down_proj.lora_a",
        "lsa.layers.0.self_attn.v_proj.weight",
        "lsa.layers.0.mlp.up_proj.weight",
        "decoder.layers.0.mlp.gate_proj.lora_b",
        "decoder.layers.3.self_attn.k_proj.lora_a",
    ] {
        let (_, v) = vars.iter().find(|(n, _)| n == trainable).unwrap();
        let analytic = common::gradient(&grads, v, &format!("no gradient reaches {trainable}"));
        common::check_gradient(trainable, v, &analytic, || {
            loss().to_scalar::<f64>().unwrap()
        });
    }
}

#[test]
fn an_adapter_for_another_shape_is_refused_clearly() {
    let m = load_model_at(&fixture("llama3").join("model"));
    let dir = tempfile::tempdir().unwrap();
    for file in ["adapter_config.json", "adapter.safetensors"] {
        std::fs::copy(
            fixture("llama3").join("adapter").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    let config = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    for ((from, to), refusal) in [
        (
            ("\"encoder_layers\": 2", "\"encoder_layers\": 9"),
            "encoder_layers 9 is not in 1..=4",
        ),
        (
            ("\"lora_rank\": 4", "\"lora_rank\": 3"),
            "has shape [32, 4], expected [32, 3]",
        ),
    ] {
        std::fs::write(&config, text.replace(from, to)).unwrap();
        let err = GmsaAdapter::load(dir.path(), &m.config, &Device::Cpu, DType::F32).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert!(shown.contains(refusal), "{shown}");
    }
}

const DOCUMENT: &str = "The cat sat on the warm stone wall and watched the birds in the garden. \
                        Then it jumped down and crossed the grass.";
const QUESTION: &str = "Where did the cat sit?";
const MAX_TOKENS: usize = 6;

/// Greedy tokens of `decoder` reading `soft` then `question`, re-reading the
/// whole sequence at every step: the answer computed without a cache.
fn greedy(decoder: &Decoder, soft: &Tensor, question: &[u32], eos: &[u32]) -> Vec<u32> {
    let mut read = question.to_vec();
    let mut answer = Vec::new();
    while answer.len() < MAX_TOKENS {
        let hidden = read_after_soft(decoder, soft, &read, None);
        let len = hidden.dim(1).unwrap();
        let last = hidden.narrow(1, len - 1, 1).unwrap();
        let next = decoder
            .logits(&last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        if eos.contains(&next) {
            break;
        }
        answer.push(next);
        read.push(next);
    }
    answer
}

fn answer_tokens(json: &[u8]) -> Vec<Vec<u32>> {
    String::from_utf8(json.to_vec())
        .unwrap()
        .lines()
        .map(|line| json_ids(&serde_json::from_str::<serde_json::Value>(line).unwrap()["tokens"]))
        .collect()
}

#[test]
fn a_gmsa_sack_round_trips_through_compress_info_and_ask() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixture("qwen2").join("adapter");
    let doc = dir.path().join("doc.txt");
    std::fs::write(&doc, DOCUMENT).unwrap();
    let file = dir.path().join("doc.sack");
    run_ok(
        sac()
            .arg("compress")
            .arg(&doc)
            .arg("--adapter")
            .arg(&adapter)
            .args(["--kv-encoding", "f32", "-q", "-o"])
            .arg(&file),
    );

    let m = load_model_at(&fixture("qwen2").join("model"));
    let gmsa = GmsaAdapter::load(&adapter, &m.config, &Device::Cpu, DType::F32).unwrap();
    let layout = PromptLayout::raw();
    let context = layout.context_ids(&m.tokenizer, DOCUMENT).unwrap();
    let soft = soft_tokens(&m.decoder, &gmsa, &context, Kernels::Inference).unwrap();
    let question = layout.question_ids(&m.tokenizer, QUESTION).unwrap();
    let expected = greedy(&m.decoder, &soft, &question, m.tokenizer.eos());

    let info = run_ok(sac().arg("info").arg(&file).arg("--json"));
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["header"]["compressor"]["method"], "gmsa");
    assert_eq!(info["format_version"], "1.3");
    assert_eq!(info["soft_tokens"], soft.dim(0).unwrap() as u64);
    assert_eq!(soft.dim(0).unwrap(), context.len().div_ceil(4));

    let max = MAX_TOKENS.to_string();
    let one =
        run_ok(
            sac()
                .arg("ask")
                .arg(&file)
                .arg(QUESTION)
                .args(["--json", "--max-tokens", &max]),
        );
    assert_eq!(answer_tokens(&one), std::slice::from_ref(&expected));
    // A random model's answer, but not a degenerate one: the comparison
    // tells tokens apart.
    assert!(expected.windows(2).any(|w| w[0] != w[1]), "{expected:?}");

    let batch = dir.path().join("questions.jsonl");
    let line = serde_json::json!({ "question": QUESTION }).to_string();
    std::fs::write(&batch, format!("{line}\n{line}\n")).unwrap();
    let both = run_ok(
        sac()
            .arg("ask")
            .arg(&file)
            .arg("--batch")
            .arg(&batch)
            .args(["--max-tokens", &max]),
    );
    assert_eq!(answer_tokens(&both), [expected.clone(), expected.clone()]);

    let shell = format!(
        "{sac:?} compress - --adapter {adapter:?} --kv-encoding f32 -q < {doc:?} | {sac:?} ask - {QUESTION:?} --json \
         --max-tokens {max}",
        sac = env!("CARGO_BIN_EXE_sac"),
    );
    let piped = run_ok(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&shell)
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert_eq!(answer_tokens(&piped), std::slice::from_ref(&expected));

    let kv_only = failing(
        sac()
            .arg("compress")
            .arg(&doc)
            .arg("--adapter")
            .arg(&adapter)
            .args(["--compressor", "sac", "-o"])
            .arg(dir.path().join("x.sack")),
    );
    assert!(
        kv_only.contains("the adapter is for the gmsa compressor, not sac"),
        "{kv_only}"
    );
}
