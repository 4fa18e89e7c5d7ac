//! Questions answered together give the tokens each gets alone, and the
//! document K/V that every row of a batch shares act as each row's own past.

mod common;

use candle_core::{Device, Tensor};
use common::{load_model, max_abs_diff, run_ok, sac, sac_fixture};
use sac::generate::{Answerer, DecoderContext, SamplingSettings};
use sac::model::{ForwardInput, LayerKv, SharedKv};
use sac::runtime::LoadedModel;

const QUESTIONS: [&str; 5] = [
    "Who?",
    "What does the document say about the budget of the city council?",
    "When was it written?",
    "Why did the team change the plan after the meeting in spring?",
    "Where?",
];

/// The K/V of a causal pass over `text` at positions 1..=L.
fn context_kv(m: &LoadedModel, text: &str) -> (Vec<LayerKv>, u32) {
    let ids = m.tokenizer.context_ids(text).unwrap();
    let out = common::causal_pass(m, &ids, 1);
    (out.kv, ids.len() as u32)
}

fn shared(past: &[LayerKv]) -> Vec<SharedKv> {
    past.iter().cloned().map(SharedKv::from).collect()
}

fn document() -> String {
    std::fs::read_to_string(sac_fixture("doc_edge.txt")).unwrap()
}

#[test]
fn a_batch_answers_as_each_question_alone() {
    for name in ["qwen2", "mistral"] {
        let m = load_model(name);
        let (past, len) = context_kv(&m, &document());
        let hidden = m.config.hidden_size;
        // The rows must differ, or equal answers would prove little.
        let mut distinct = std::collections::HashSet::new();
        // With and without a learned prefix read before the question ([LM]).
        let prefixes = [
            None,
            Some(Tensor::randn(0f32, 1.0, (1, hidden), &Device::Cpu).unwrap()),
        ];
        for prefix in prefixes {
            let with_prefix = prefix.is_some();
            let answerer = Answerer::new(
                &m.decoder,
                DecoderContext {
                    past: shared(&past),
                    question_position: len + 1,
                    prefix,
                    lora: None,
                },
                m.tokenizer.eos(),
            )
            .unwrap();
            let ids: Vec<Vec<u32>> = QUESTIONS
                .iter()
                .map(|q| m.tokenizer.question_ids(q).unwrap())
                .collect();
            let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            for temperature in [0.0, 0.9] {
                let sampling = SamplingSettings {
                    temperature,
                    top_p: None,
                    seed: 7,
                    max_tokens: 12,
                };
                let together = answerer
                    .answer_batch(&ids, &sampling, |_, _| Ok(true))
                    .unwrap();
                for (q, batched) in ids.iter().zip(&together) {
                    let alone = answerer.answer(q, &sampling, |_| Ok(true)).unwrap();
                    assert_eq!(
                        batched.tokens, alone.tokens,
                        "{name}, prefix {with_prefix}, temperature {temperature}"
                    );
                    assert_eq!(batched.stop, alone.stop);
                    distinct.insert(alone.tokens.clone());
                }
            }
        }
        assert!(distinct.len() > 2, "{name}: the answers hardly differ");
    }
}

#[test]
fn stopping_one_row_stops_the_batch() {
    let m = load_model("qwen2");
    let (past, len) = context_kv(&m, &document());
    let answerer = Answerer::new(
        &m.decoder,
        DecoderContext {
            past: shared(&past),
            question_position: len + 1,
            prefix: None,
            lora: None,
        },
        &[],
    )
    .unwrap();
    let ids: Vec<Vec<u32>> = QUESTIONS[..3]
        .iter()
        .map(|q| m.tokenizer.question_ids(q).unwrap())
        .collect();
    let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let sampling = SamplingSettings {
        temperature: 0.0,
        top_p: None,
        seed: 0,
        max_tokens: 20,
    };
    let mut seen = 0;
    let out = answerer
        .answer_batch(&ids, &sampling, |row, _| {
            seen += 1;
            Ok(!(row == 1 && seen > 4))
        })
        .unwrap();
    for generation in &out {
        assert_eq!(generation.stop, sac::generate::Stop::Interrupted);
        assert!(generation.tokens.len() < 20);
    }
}

/// One forward pass of `rows` one-token queries over the context, as shared
/// K/V (with `bias`) or as each row's own past.
fn attend(m: &LoadedModel, shared: Option<&[SharedKv]>, past: Option<&[LayerKv]>) -> Tensor {
    let ids = Tensor::new(&[[5u32], [17], [42]], &Device::Cpu).unwrap();
    let positions = Tensor::new(&[[40u32], [40], [41]], &Device::Cpu).unwrap();
    let embeds = m.decoder.embed(&ids).unwrap();
    let out = m
        .decoder
        .forward(ForwardInput {
            shared,
            past,
            ..ForwardInput::causal(&embeds, &positions)
        })
        .unwrap();
    m.decoder.logits(&out.hidden).unwrap()
}

#[test]
fn shared_kv_is_every_rows_past_and_bias_hides_slots() {
    let m = load_model("qwen3");
    let (past, _) = context_kv(&m, "A short text about red birds.");
    let rows = |kv: &LayerKv| LayerKv {
        k: kv.k.repeat((3, 1, 1, 1)).unwrap(),
        v: kv.v.repeat((3, 1, 1, 1)).unwrap(),
    };
    let per_row: Vec<LayerKv> = past.iter().map(rows).collect();
    let shared: Vec<SharedKv> = past.iter().cloned().map(SharedKv::from).collect();
    let expected = attend(&m, None, Some(&per_row));
    assert!(max_abs_diff(&attend(&m, Some(&shared), None), &expected) < 1e-5);

    // A bias of -inf on slot 2 for every head equals dropping slot 2.
    let len = past[0].len();
    let kept: Vec<u32> = (0..len as u32).filter(|&i| i != 2).collect();
    let kept = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
    let dropped: Vec<LayerKv> = per_row.iter().map(|l| l.select(&kept).unwrap()).collect();
    let heads = m.config.num_kv_heads;
    let mut bias = vec![0f32; heads * len];
    for head in 0..heads {
        bias[head * len + 2] = f32::NEG_INFINITY;
    }
    let bias = Tensor::from_vec(bias, (heads, len), &Device::Cpu).unwrap();
    let masked: Vec<SharedKv> = past
        .iter()
        .map(|kv| SharedKv {
            kv: kv.clone(),
            bias: Some(bias.clone()),
        })
        .collect();
    let expected = attend(&m, None, Some(&dropped));
    assert!(max_abs_diff(&attend(&m, Some(&masked), None), &expected) < 1e-5);
}

#[test]
fn cli_batch_matches_separate_asks() {
    let dir = tempfile::tempdir().unwrap();
    let sack = dir.path().join("doc.sack");
    let adapter = sac_fixture("adapter");
    run_ok(
        sac()
            .arg("compress")
            .arg(sac_fixture("doc_long.txt"))
            .arg("-o")
            .arg(&sack)
            .arg("--adapter")
            .arg(&adapter)
            .args(["-m", common::fixture_dir("llama3").to_str().unwrap()])
            .args(["--kv-encoding", "f32", "-q"]),
    );
    let questions = dir.path().join("questions.txt");
    std::fs::write(&questions, QUESTIONS.join("\n")).unwrap();
    let batch = run_ok(
        sac()
            .arg("ask")
            .arg(&sack)
            .arg("--batch")
            .arg(&questions)
            .args(["--batch-size", "2", "--max-tokens", "8"]),
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&batch)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), QUESTIONS.len());
    for (i, (line, question)) in lines.iter().zip(QUESTIONS).enumerate() {
        assert_eq!(line["id"], i + 1);
        let alone =
            run_ok(
                sac()
                    .arg("ask")
                    .arg(&sack)
                    .arg(question)
                    .args(["--json", "--max-tokens", "8"]),
            );
        let alone: serde_json::Value = serde_json::from_slice(&alone).unwrap();
        assert_eq!(line["tokens"], alone["tokens"], "{question}");
        assert_eq!(line["answer"], alone["answer"]);
    }
}
