//! Per-head kept sets through a .sack and back into the decoder, and every
//! compressor through the binary.

use candle_core::{Device, Tensor};
use sac::compress::{Compressor, Kept, Request, kvzip};
use sac::generate::DecoderContext;
use sac::model::{ForwardInput, ForwardOutput, LayerKv, SharedKv};
use sac::runtime::LoadedModel;
use sac::sack::{KeptLayout, KvEncoding, SackReader, SackWriter, WriteOptions};
use sac::to_sack::{self, DocumentFacts};

use crate::common::{failing, fixture_dir, load_model, max_abs_diff, run_ok, sac, sac_fixture};
use crate::kept::{strategy, text};

/// Per layer and KV head: the kept offsets and their keys `[n, head_dim]`.
type Emitted = Vec<Vec<(Vec<u32>, Vec<f32>)>>;

/// A kvzip .sack of [`text`] in f32, with what was emitted.
fn kvzip_sack(m: &LoadedModel) -> (Vec<u8>, Emitted) {
    let c = &m.config;
    let text = text();
    let ids = m.tokenizer.context_ids(&text).unwrap();
    let compressor = Compressor::new(
        &m.decoder,
        strategy(m, Request::new(&kvzip::METHOD), ids.len()),
    );
    let facts = DocumentFacts {
        text: &text,
        tokens: ids.len(),
        name: None,
        layout: &sac::layout::prompt::PromptLayout::raw(),
    };
    let header = to_sack::header(m, compressor.strategy(), None, &facts).unwrap();
    assert_eq!(header.kv.layout, KeptLayout::PerHead);
    let options = WriteOptions {
        encoding: KvEncoding::F32,
        zstd_level: Some(3),
    };
    let mut bytes = Vec::new();
    let mut emitted = vec![vec![(Vec::new(), Vec::new()); c.num_kv_heads]; c.num_layers];
    let mut writer = SackWriter::to_stream(&mut bytes, "<memory>", &header, options).unwrap();
    to_sack::overlapped(&mut writer, |write| {
        compressor.compress(&ids, |out| {
            write(&out)?;
            let chunk = out.into_kv()?;
            let Kept::PerHead(sets) = &chunk.kept else {
                panic!("kvzip keeps per head");
            };
            for (layer, kv) in chunk.layers.iter().enumerate() {
                for (head, (offsets, keys)) in emitted[layer].iter_mut().enumerate() {
                    let positions = &sets[layer][head];
                    offsets.extend(positions.iter().map(|p| p - 1));
                    let k = kv.k.get(0)?.get(head)?.narrow(0, 0, positions.len())?;
                    keys.extend(k.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            Ok(())
        })
    })
    .unwrap();
    writer.finish().unwrap();
    (bytes, emitted)
}

#[test]
fn per_head_positions_survive_the_sack_round_trip() {
    let m = load_model("mistral");
    let (bytes, emitted) = kvzip_sack(&m);
    let mut reader = SackReader::from_bytes(bytes, "<memory>").unwrap();
    assert!(reader.segments() >= 3, "several segments expected");
    assert_eq!(reader.header().compressor.method, "kvzip");
    for (layer, heads) in emitted.iter().enumerate() {
        let read = reader.read_layer(layer as u32).unwrap();
        for (head, (offsets, keys)) in heads.iter().enumerate() {
            assert_eq!(
                &read.heads[head].positions, offsets,
                "layer {layer} head {head}"
            );
            assert_eq!(&read.heads[head].keys, keys, "layer {layer} head {head}");
        }
    }
    let sets: Vec<&Vec<u32>> = emitted.iter().flatten().map(|(o, _)| o).collect();
    assert!(
        sets.iter().any(|s| s != &sets[0]),
        "the heads keep different positions"
    );
}

/// One causal pass of `ids` at positions `first..`, reading `shared` first.
fn pass(m: &LoadedModel, ids: &[u32], first: u32, shared: Option<&[SharedKv]>) -> ForwardOutput {
    let ids_t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let embeds = m.decoder.embed(&ids_t).unwrap();
    let n = ids.len() as u32;
    let positions = Tensor::arange(first, first + n, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.decoder
        .forward(ForwardInput {
            shared,
            ..ForwardInput::causal(&embeds, &positions)
        })
        .unwrap()
}

/// Logits of a question read after `context` at L + 1.
fn logits(m: &LoadedModel, context: &[SharedKv], len: usize) -> Tensor {
    let ids = m.tokenizer.question_ids("Who opened it?").unwrap();
    let out = pass(m, &ids, len as u32 + 1, Some(context));
    m.decoder.logits(&out.hidden).unwrap()
}

#[test]
fn a_per_head_sack_reads_as_each_heads_kept_kv() {
    for name in ["llama3", "qwen3"] {
        let m = load_model(name);
        let (bytes, emitted) = kvzip_sack(&m);
        let mut reader = SackReader::from_bytes(bytes, "<memory>").unwrap();
        let DecoderContext {
            past,
            question_position,
            ..
        } = crate::common::load_context(&mut reader, &m.decoder);
        let ids = m.tokenizer.context_ids(&text()).unwrap();
        let len = ids.len();
        assert_eq!(question_position as usize, len + 1);
        assert!(
            past.iter().all(|l| l.bias.is_some()),
            "{name}: padded layers"
        );

        // Brute force: the whole context's K/V at their own positions, each
        // head seeing only the positions it kept.
        let full: Vec<LayerKv> = pass(&m, &ids, 1, None).kv;
        let kept_only: Vec<SharedKv> = full
            .iter()
            .zip(&emitted)
            .map(|(kv, heads)| {
                let bias: Vec<f32> = heads
                    .iter()
                    .flat_map(|(offsets, _)| {
                        (0..len as u32).map(|p| match offsets.contains(&p) {
                            true => 0.0,
                            false => f32::NEG_INFINITY,
                        })
                    })
                    .collect();
                SharedKv {
                    kv: kv.clone(),
                    bias: Some(Tensor::from_vec(bias, (heads.len(), len), &Device::Cpu).unwrap()),
                }
            })
            .collect();
        let loaded = logits(&m, &past, len);
        let d = max_abs_diff(&loaded, &logits(&m, &kept_only, len));
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let everything: Vec<SharedKv> = full.into_iter().map(SharedKv::from).collect();
        let d = max_abs_diff(&loaded, &logits(&m, &everything, len));
        assert!(d > 1e-3, "{name}: dropping K/V changed nothing ({d})");
    }
}

#[test]
fn every_compressor_answers_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_dir("llama3");
    for (compressor, per_prefill) in [
        ("kvzip", true),
        ("snapkv", true),
        ("streaming", true),
        ("full", true),
        ("uniform", false),
        ("auto", true),
    ] {
        let sack = dir.path().join(format!("{compressor}.sack"));
        let mut cmd = sac();
        cmd.arg("compress")
            .arg(sac_fixture("doc_edge.txt"))
            .arg("-o")
            .arg(&sack)
            .arg("-m")
            .arg(&model)
            .args(["--compressor", compressor]);
        let out = cmd.output().unwrap();
        let summary = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{compressor}: {summary}");
        assert_eq!(summary.contains("x its prefill"), per_prefill, "{summary}");
        let answer = run_ok(sac().arg("ask").arg(&sack).args([
            "Who opened a blue friend?",
            "--json",
            "--max-tokens",
            "4",
        ]));
        let record: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert!(record["answer"].is_string(), "{compressor}: {record}");
        let tokens = record["tokens"].as_array().unwrap().len();
        assert!((1..=4).contains(&tokens), "{compressor}: {record}");
    }
}

#[test]
fn selectors_refuse_what_they_cannot_do_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.sack");
    let model = fixture_dir("qwen2");
    let adapter = sac_fixture("adapter");
    for (flags, expected) in [
        (
            vec![
                "--compressor",
                "kvzip",
                "--adapter",
                adapter.to_str().unwrap(),
            ],
            "takes no adapter",
        ),
        // Some 2,600 tokens, then the chunk (capped at the document) repeated
        // after them: past 4096.
        (
            vec!["--compressor", "kvzip", "--chunk-size", "3000"],
            "--chunk-size",
        ),
        (
            vec!["--compressor", "full", "--sinks", "2"],
            "--sinks applies to the training-free compressors",
        ),
        (
            vec!["--compressor", "streaming", "--head-budget", "even"],
            "--head-budget applies to kvzip and snapkv",
        ),
    ] {
        let doc = dir.path().join("doc.txt");
        let text = std::fs::read_to_string(sac_fixture("doc_long.txt")).unwrap();
        std::fs::write(&doc, text.repeat(2)).unwrap();
        let err = failing(
            sac()
                .arg("compress")
                .arg(&doc)
                .arg("-o")
                .arg(&out)
                .arg("-m")
                .arg(&model)
                .args(&flags),
        );
        assert!(err.contains(expected), "{flags:?}: {err}");
        assert!(!out.exists());
    }
}
