//! GMSA against HF transformers + PEFT following the official code
//! (tests/fixtures/gmsa, made by scripts/make_gmsa_fixtures.py): the pooled
//! vectors, the soft tokens, and the decoder's logits over the soft tokens
//! and a question, in f32.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sac::adapter::gmsa::GmsaAdapter;
use sac::compress::gmsa::{group_merge, soft_tokens};
use sac::model::{ForwardInput, Kernels};

use common::{load_model_at, max_abs_diff};

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

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

#[test]
fn soft_tokens_and_logits_match_transformers_and_peft() {
    for name in ["llama3", "qwen2"] {
        let m = load_model_at(&fixture(name).join("model"));
        let adapter = GmsaAdapter::load(
            &fixture(name).join("adapter"),
            &m.config,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let r = reference(name);
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

        let question = Tensor::new(ids(&r["question_ids"]).as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let embeds = Tensor::cat(
            &[
                soft.unsqueeze(0).unwrap(),
                m.decoder.embed(&question).unwrap(),
            ],
            1,
        )
        .unwrap();
        let len = embeds.dim(1).unwrap() as u32;
        let positions = Tensor::arange(0u32, len, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = m
            .decoder
            .forward(ForwardInput::causal(&embeds, &positions))
            .unwrap();
        let logits = m.decoder.logits(&out.hidden.squeeze(0).unwrap()).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= TOLERANCE, "{name}: logits differ by {d}");
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
    std::fs::write(
        &config,
        text.replace("\"encoder_layers\": 2", "\"encoder_layers\": 9"),
    )
    .unwrap();
    let err = GmsaAdapter::load(dir.path(), &m.config, &Device::Cpu, DType::F32).unwrap_err();
    let shown = format!("{:#}", anyhow::Error::from(err));
    assert!(
        shown.contains("encoder_layers 9 is not in 1..=4"),
        "{shown}"
    );

    std::fs::write(
        &config,
        text.replace("\"lora_rank\": 4", "\"lora_rank\": 3"),
    )
    .unwrap();
    let err = GmsaAdapter::load(dir.path(), &m.config, &Device::Cpu, DType::F32).unwrap_err();
    let shown = format!("{:#}", anyhow::Error::from(err));
    assert!(
        shown.contains("has shape [32, 4], expected [32, 3]"),
        "{shown}"
    );
}
