//! `sac train` on the tiny fixture models: the loss falls, only the adapter
//! moves, a resumed run equals an uninterrupted one, gradients reach the
//! compressor through the anchors' K/V, the training loss is the reference
//! decoder's, and bad input stops the run in one line with nothing written.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::train::{
    adapter_tensors, compress_and_ask, doc, log, losses, qa_rows, s, train, train_ok, write_rows,
};
use common::{fixture_dir, max_abs_diff, sac_fixture};
use sac::adapter::{AdapterConfig, Config, Loaded, SacAdapter};
use sac::model::{ForwardInput, Kernels};
use sac::train::data::Sample;
use sac::train::params::Trainables;
use sac::train::{Length, PretrainWindow, Stage, TrainMethod, TrainSettings, Trainer, step};
use serde_json::Value;

/// Only the anchors' K/V leave the compressor, and the last layer's queries
/// shape none of them: its q LoRA gets no gradient (nor does it in the
/// reference). The fixtures have 2 layers.
const LAST_LAYER_QUERY: &str = "layers.1.self_attn.q_proj";

#[test]
fn training_lowers_the_loss_and_moves_every_trainable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    write_rows(&data, &qa_rows(1));
    let out = dir.path().join("adapter");
    let weights = fixture_dir("llama3").join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["--data", s(&data), "--out", s(&out), "--stage", "qa"];
        args.extend(["--steps", "10", "--grad-accum", "1", "--lr", "1e-2"]);
        args.extend(extra);
        train_ok("llama3", &args);
    };
    run(&["--stop-after", "2"]);
    let early = adapter_tensors(&out);
    run(&["--resume"]);
    let late = adapter_tensors(&out);

    let losses = losses(&out);
    assert_eq!(losses.len(), 10);
    assert!(
        losses[9] < 0.9 * losses[0],
        "the loss does not fall: {losses:?}"
    );
    assert_eq!(
        early.len(),
        2 + 2 * 2 * 2,
        "roles, specials, 2 layers x q/v x A/B"
    );
    for (name, t) in &late {
        let moved = max_abs_diff(t, &early[name]);
        if name.starts_with(LAST_LAYER_QUERY) {
            assert_eq!(moved, 0.0, "{name} moved");
        } else {
            assert!(moved > 1e-6, "{name} did not move");
        }
    }
    // [AE] is trained only by autoencoding, which sac train does not do.
    let ae = |m: &HashMap<String, Tensor>| m["special_tokens"].get(0).unwrap();
    assert_eq!(max_abs_diff(&ae(&early), &ae(&late)), 0.0);
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "base weights changed"
    );

    // The result is an adapter `compress` takes as it is.
    let record = compress_and_ask(dir.path(), &out);
    assert!(record["tokens"].is_array());
}

#[test]
fn base_weights_stay_bit_identical_in_memory() {
    let model = common::load_model("qwen2");
    let logits = || {
        let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250]], &Device::Cpu).unwrap();
        let positions = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
        let embeds = model.decoder.embed(&ids).unwrap();
        let out = model
            .decoder
            .forward(ForwardInput::causal(&embeds, &positions))
            .unwrap();
        model.decoder.logits(&out.hidden).unwrap()
    };
    let before = logits();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qa.jsonl");
    write_rows(&data, &qa_rows(2));
    let settings = TrainSettings {
        method: TrainMethod::Sac,
        stage: Stage::Qa,
        data,
        eval: None,
        out: dir.path().join("out"),
        init: None,
        init_any_model: false,
        ratio: Some(4),
        chunk_size: Some(16),
        lora_rank: Some(4),
        lora_targets: None,
        encoder_layers: None,
        lsa_layers: None,
        lr: 1e-2,
        warmup_steps: None,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        batch: 1,
        grad_accum: 2,
        length: Length::Steps(3),
        save_every: 100,
        stop_after: None,
        resume: false,
        seed: 3,
        window: PretrainWindow {
            min_context: 16,
            max_context: 32,
            continuation: 8,
        },
        eval_max_tokens: 4,
    };
    let mut trainer = Trainer::new(&model, settings).unwrap();
    trainer.run(|_| {}).unwrap();
    assert_eq!(trainer.step(), 3);
    assert_eq!(max_abs_diff(&before, &logits()), 0.0);
}

#[test]
fn resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("text.jsonl");
    let text = doc();
    let rows: Vec<Value> = (0..3)
        .map(|i| serde_json::json!({"text": &text[i * 300..i * 300 + 700]}))
        .collect();
    write_rows(&data, &rows);
    let eval = dir.path().join("eval.jsonl");
    write_rows(&eval, &qa_rows(2));
    let (whole, halves) = (dir.path().join("whole"), dir.path().join("halves"));
    // 4 steps of 2 x 2 samples from 3 texts: the order crosses epochs.
    let args = |out: &Path, lr: &str| -> Vec<String> {
        [
            "--data",
            s(&data),
            "--eval",
            s(&eval),
            "--out",
            s(out),
            "--steps",
            "4",
            "--batch",
            "2",
            "--grad-accum",
            "2",
            "--save-every",
            "2",
            "--lr",
            lr,
            "--min-context",
            "20",
            "--max-context",
            "60",
            "--continuation",
            "12",
            "--eval-max-tokens",
            "4",
            "--weight-decay",
            "0.01",
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |out: &Path, extra: &[&str]| {
        let mut a = args(out, "5e-3");
        a.extend(extra.iter().map(|x| x.to_string()));
        train_ok("qwen2", &a.iter().map(String::as_str).collect::<Vec<_>>());
    };
    run(&whole, &[]);
    run(&halves, &["--stop-after", "2"]);
    assert_eq!(losses(&halves).len(), 2);
    run(&halves, &["--resume"]);

    let (a, b) = (adapter_tensors(&whole), adapter_tensors(&halves));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let d = max_abs_diff(t, &b[name]);
        assert!(d <= 1e-6, "{name} differs by {d} after resuming");
    }
    assert_eq!(losses(&whole), losses(&halves));
    let evals = |dir: &Path| -> Vec<u64> {
        log(dir)
            .iter()
            .filter(|r| r.get("eval_f1").is_some())
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(evals(&whole), [2, 4]);
    assert_eq!(evals(&halves), [2, 4]);
    // A resumed run must keep the settings the checkpoint was made with.
    let mut changed = args(&halves, "1e-3");
    changed.push("--resume".into());
    let out = train(
        "qwen2",
        &changed.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("lr 0.005, not 0.001"), "{err}");
}

/// Runs `sac train` expecting a one-line error containing `expected`, with
/// nothing written to the output directory.
fn assert_refused(dir: &Path, args: &[&str], expected: &str) {
    let out_dir = dir.join("out");
    let listing = |p: &Path| -> Vec<(String, Vec<u8>)> {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .map(|rd| {
                rd.map(|e| {
                    let e = e.unwrap();
                    let bytes = std::fs::read(e.path()).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), bytes)
                })
                .collect()
            })
            .unwrap_or_default();
        entries.sort();
        entries
    };
    let before = listing(&out_dir);
    let existed = out_dir.exists();
    let mut all = vec!["--out", s(&out_dir)];
    all.extend(args);
    let out = train("llama3", &all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.contains(expected),
        "{args:?}: expected `{expected}` in {err}"
    );
    assert_eq!(out_dir.exists(), existed, "{args:?} created the output");
    assert_eq!(listing(&out_dir), before, "{args:?} wrote into the output");
}

#[test]
fn bad_input_is_refused_in_one_line_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let good = file("good.jsonl", &format!("{}\n", qa_rows(1)[0]));
    let missing = d.join("missing.jsonl").to_string_lossy().into_owned();
    let bad_json = file("bad.jsonl", &format!("{}\n{{oops\n", qa_rows(1)[0]));
    let empty = file("empty.jsonl", "\n  \n");
    let no_answer = file("na.jsonl", "{\"context\": \"c\", \"question\": \"q\"}\n");
    let qa = ["--stage", "qa", "--steps", "1"];
    let with = |data: &str| -> Vec<String> {
        ["--data", data]
            .iter()
            .chain(&qa)
            .map(|x| x.to_string())
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&missing), "missing.jsonl"),
        (with(&bad_json), "bad.jsonl line 2: not valid JSON"),
        (with(&empty), "empty.jsonl holds no rows"),
        (with(&no_answer), "na.jsonl line 1: no \"answer\""),
        (
            ["--data", &good, "--steps", "2", "--epochs", "1"]
                .map(String::from)
                .to_vec(),
            "--steps or --epochs, not both",
        ),
        (
            ["--data", &good, "--stage", "qa", "--resume"]
                .map(String::from)
                .to_vec(),
            "holds no checkpoint.safetensors",
        ),
        (
            ["--data", &good, "--stage", "qa", "--eval", &bad_json]
                .map(String::from)
                .to_vec(),
            "bad.jsonl line 2",
        ),
        (
            [
                "--data",
                &good,
                "--min-context",
                "100",
                "--max-context",
                "50",
            ]
            .map(String::from)
            .to_vec(),
            "--min-context 100 exceeds --max-context 50",
        ),
    ];
    for (args, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(d, &args, expected);
    }
    // A finished run is not overwritten without --resume.
    train_ok(
        "llama3",
        &[
            "--data",
            &good,
            "--out",
            s(&d.join("out")),
            "--stage",
            "qa",
            "--steps",
            "1",
        ],
    );
    assert_refused(
        d,
        &with(&good).iter().map(String::as_str).collect::<Vec<_>>(),
        "already holds",
    );
}

/// The loss of a sample whose answer is the SAC reference answer equals the
/// cross-entropy of the reference decoder's logits (HF transformers, the
/// fixture adapter): training reads the prompt exactly as inference does.
#[test]
fn training_loss_is_the_reference_decoders() {
    let model = common::load_model("llama3");
    let adapter = SacAdapter::load(
        &sac_fixture("adapter"),
        &model.config,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let reference =
        candle_core::safetensors::load(sac_fixture("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = |name: &str| -> Vec<u32> {
        reference[&format!("long.{name}")]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let text = doc();
    let sample = Sample {
        context: model.tokenizer.context_ids(&text).unwrap(),
        prompt: model
            .tokenizer
            .question_ids("What is the first word?")
            .unwrap(),
        target: ids("answer_ids"),
    };
    assert_eq!(sample.context, ids("context_ids"));
    let logits = reference["long.answer_logits"]
        .to_dtype(DType::F64)
        .unwrap();
    let targets = Tensor::new(sample.target.as_slice(), &Device::Cpu).unwrap();
    let expected = candle_nn::loss::cross_entropy(&logits, &targets)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    for path in [Kernels::Training, Kernels::Inference] {
        let loss = step::sample_loss(&model.decoder, &adapter, &sample, path)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (loss - expected).abs() <= 1e-4,
            "{path:?}: loss {loss}, reference {expected}"
        );
    }
}

/// A SAC run on `decoder` with anchors every 3 tokens of 8-token chunks
/// (its LoRA B away from zero, which would leave A without gradient), and a
/// sample whose 20-token context makes three chunks.
fn three_chunk_run(decoder: &sac::model::Decoder) -> (Trainables, Sample) {
    let config = AdapterConfig {
        method: "sac".into(),
        ratio: 3,
        chunk_size: 8,
        mem_size: 3,
        lora_rank: 3,
        lora_scale: 2.0,
        lora_targets: vec!["q_proj".into(), "v_proj".into()],
        base_model: "fixture".into(),
        base_model_fingerprint: None,
    };
    let params = Trainables::init(Config::Sac(config), decoder, 11).unwrap();
    for (i, (name, var)) in params.named().enumerate() {
        if name.ends_with("lora_b") {
            let values: Vec<f32> = (0..var.elem_count())
                .map(|j| 0.3 * (j as f32 * 0.37 + i as f32).sin())
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let sample = Sample {
        context: (0..20u32).map(|i| (i * 37 + 5) % 300).collect(),
        prompt: vec![3, 9, 27],
        target: vec![81, 243, 29, 87],
    };
    (params, sample)
}

/// The gradients of [`three_chunk_run`]'s sample on the fixture model in `dtype`.
fn three_chunk_gradients(dtype: DType) -> Vec<Tensor> {
    let fx = common::Fixture::load("llama3", dtype);
    let (params, sample) = three_chunk_run(&fx.decoder);
    step::backward(&fx.decoder, &params, &[sample], 1.0)
        .unwrap()
        .1
}

/// Backpropagation from the decoder's loss through the anchors' K/V of three
/// chunks into every trainable tensor, checked against central finite
/// differences (f64 model; the f32 variables are perturbed by exactly
/// representable steps).
#[test]
fn gradients_reach_the_adapter_through_the_anchors() {
    let fx = common::Fixture::load("llama3", DType::F64);
    let decoder = &fx.decoder;
    let (params, sample) = three_chunk_run(decoder);
    let (_, grads) = step::backward(decoder, &params, std::slice::from_ref(&sample), 1.0).unwrap();
    let loss = || {
        let Loaded::Sac(adapter) = params.adapter(decoder.config(), DType::F64).unwrap() else {
            unreachable!("a SAC run")
        };
        step::sample_loss(decoder, &adapter, &sample, Kernels::Training)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for ((name, var), grad) in params.named().zip(&grads) {
        let analytic: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            analytic.iter().any(|g| g.abs() > 1e-7),
            !name.starts_with(LAST_LAYER_QUERY),
            "gradient of {name}"
        );
        let original: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = original.len();
        let at = |idx: usize, delta: f32| -> (f64, f64) {
            let mut x = original.clone();
            x[idx] += delta;
            let step = f64::from(x[idx]) - f64::from(original[idx]);
            var.set(&Tensor::from_vec(x, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            (loss(), step)
        };
        let largest = (0..n)
            .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
            .unwrap();
        for idx in [largest, n / 3, n - 1] {
            let (up, h_up) = at(idx, 1e-3);
            let (down, h_down) = at(idx, -1e-3);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (up - down) / (h_up - h_down);
            let g = f64::from(analytic[idx]);
            assert!(
                (g - numeric).abs() <= 1e-6 + 1e-3 * g.abs().max(numeric.abs()),
                "{name}[{idx}]: backprop {g}, finite difference {numeric}"
            );
        }
    }
}

/// The path CPU training takes in f32 (the tiled attention, whose backward
/// pass recomputes the probabilities, and the fused kernels) gives the
/// gradients of the f64 path that the finite differences above check.
#[test]
fn f32_gradients_are_the_f64_ones() {
    let exact = three_chunk_gradients(DType::F64);
    let fast = three_chunk_gradients(DType::F32);
    for (e, f) in exact.iter().zip(&fast) {
        let scale = e
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(e, f);
        assert!(
            diff <= 1e-5 * scale + 1e-7,
            "{:?}: f32 and f64 gradients differ by {diff} (largest {scale})",
            e.shape()
        );
    }
}
