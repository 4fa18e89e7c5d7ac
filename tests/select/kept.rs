//! The positions each selector keeps are exactly the reference's choice.

use sac::compress::{
    Compressor, HeadBudget, Kept, Method, RepeatPrompt, Request, Settings, Strategy, full, kvzip,
    snapkv, streaming, uniform,
};
use sac::runtime::LoadedModel;

use crate::common::{PARITY_MODELS, load_model, sac_fixture};
use crate::reference::{Reference, Scores, kvzip_chunk, snapkv, top_k};

/// Small enough for a brute-force pass, long enough for several chunks.
pub const CHUNK: usize = 40;
pub const RATIO: usize = 4;

/// The start of the edge-case document: about 130 tokens.
pub fn text() -> String {
    std::fs::read_to_string(sac_fixture("doc_edge.txt")).unwrap()[..190].to_string()
}

/// `method` at [`RATIO`] (1 for `full`) in chunks of [`CHUNK`], the rest
/// as `request` says, for a context of `len` tokens in the raw layout.
pub fn strategy(m: &LoadedModel, request: Request, len: usize) -> Box<dyn Strategy> {
    let ratio = if request.method == &full::METHOD {
        1
    } else {
        RATIO
    };
    let request = Request {
        ratio: Some(ratio),
        chunk_size: Some(CHUNK),
        ..request
    };
    let layout = sac::layout::prompt::PromptLayout::raw();
    Settings::resolve(&request, None)
        .unwrap()
        .build(None, || RepeatPrompt::new(&m.tokenizer, &layout), len)
        .unwrap()
}

/// Offsets kept per layer and KV head, from every emitted chunk.
pub fn compressed(m: &LoadedModel, method: &'static Method, ids: &[u32]) -> Vec<Vec<Vec<usize>>> {
    compressed_with(m, Request::new(method), ids)
}

/// [`compressed`] by the compressor `request` asks for.
pub fn compressed_with(m: &LoadedModel, request: Request, ids: &[u32]) -> Vec<Vec<Vec<usize>>> {
    let c = &m.config;
    let compressor = Compressor::new(&m.decoder, strategy(m, request, ids.len()));
    let mut kept = vec![vec![Vec::new(); c.num_kv_heads]; c.num_layers];
    compressor
        .compress(ids, |out| {
            let chunk = out.into_kv()?;
            for (layer, heads) in kept.iter_mut().enumerate() {
                for (head, set) in heads.iter_mut().enumerate() {
                    let positions = match &chunk.kept {
                        Kept::Shared(positions) => positions,
                        Kept::PerHead(sets) => &sets[layer][head],
                    };
                    set.extend(positions.iter().map(|&p| p as usize - 1));
                }
            }
            Ok(())
        })
        .unwrap();
    kept
}

fn zeros(m: &LoadedModel, len: usize) -> Scores {
    vec![vec![vec![0.0; len]; m.config.num_kv_heads]; m.config.num_layers]
}

fn budget(m: &LoadedModel, len: usize) -> usize {
    (m.config.num_layers * m.config.num_kv_heads * len).div_ceil(RATIO)
}

#[test]
fn kvzip_keeps_the_top_reconstruction_scores() {
    for name in PARITY_MODELS {
        let m = load_model(name);
        let reference = Reference::new(name, &m);
        let ids = m.tokenizer.context_ids(&text()).unwrap();
        let len = ids.len();
        let sinks = 4;
        let group = m.config.num_heads / m.config.num_kv_heads;
        let encode = |s: &str| m.tokenizer.encode(s).unwrap();
        let mut scores = zeros(&m, len);
        let starts: Vec<usize> = (sinks..len).step_by(CHUNK).collect();
        assert!(starts.len() >= 3, "{name}: too few chunks");
        for (i, &start) in starts.iter().enumerate() {
            let chunk = start..(start + CHUNK).min(len);
            let mut input = ids.clone();
            if i == 0 {
                input.extend(encode(
                    "\n### Question:\nRepeat the previous context exactly.\n### Answer:\n",
                ));
            } else {
                input.extend(encode(
                    "\n### Question:\nRepeat the part of the previous context exactly, starting with",
                ));
                input.extend(&ids[start - 8..start]);
                input.extend(encode("\n### Answer:\n"));
            }
            input.extend(&ids[chunk.clone()]);
            kvzip_chunk(
                &reference.logits(&input),
                &mut scores,
                len,
                sinks,
                chunk,
                group,
            );
        }
        let (expected, gap) = top_k(&scores, 0..sinks, budget(&m, len));
        assert!(gap > 1e-5, "{name}: near-tie at the budget's edge ({gap})");
        assert_eq!(compressed(&m, &kvzip::METHOD, &ids), expected, "{name}");
        let counts: Vec<usize> = expected.iter().flatten().map(Vec::len).collect();
        assert!(
            counts.iter().any(|&n| n != counts[0]),
            "{name}: every head keeps {counts:?}; the budget should not be uniform"
        );
    }
}

/// SnapKV's paper rule with KVzip's shared budget and no sinks
/// (`--sinks 0 --head-budget shared`).
#[test]
fn snapkv_keeps_the_top_window_scores() {
    for name in PARITY_MODELS {
        let m = load_model(name);
        let ids = m.tokenizer.context_ids(&text()).unwrap();
        let len = ids.len();
        let slots = m.config.num_layers * m.config.num_kv_heads;
        // Each head's share of the budget is below 64 here, so it sets the window.
        let window = budget(&m, len) / slots;
        assert!(window < 64 && window > 1);
        let logits = Reference::new(name, &m).logits(&ids);
        let scores = snapkv(&logits, m.config.num_kv_heads, window);
        let (expected, gap) = top_k(&scores, len - window..len, budget(&m, len));
        assert!(gap > 1e-5, "{name}: near-tie at the budget's edge ({gap})");
        let request = Request {
            sinks: Some(0),
            head_budget: Some(HeadBudget::Shared),
            ..Request::new(&snapkv::METHOD)
        };
        let kept = compressed_with(&m, request, &ids);
        assert_eq!(kept, expected, "{name}");
    }
}

/// The default: the 4 sinks and the window for every head, and each head's
/// equal share filled with its own best window scores (kvpress's
/// `SnapKVPress`, plus the sinks).
#[test]
fn snapkv_gives_every_head_its_share_by_default() {
    for name in PARITY_MODELS {
        let m = load_model(name);
        let ids = m.tokenizer.context_ids(&text()).unwrap();
        let len = ids.len();
        let slots = m.config.num_layers * m.config.num_kv_heads;
        let share = budget(&m, len).div_ceil(slots);
        let window = budget(&m, len) / slots - 4;
        let scores = snapkv(
            &Reference::new(name, &m).logits(&ids),
            m.config.num_kv_heads,
            window,
        );
        let forced = |p: usize| p < 4 || p >= len - window;
        let expected: Vec<Vec<Vec<usize>>> = scores
            .iter()
            .map(|heads| {
                heads
                    .iter()
                    .map(|row| {
                        let mut rest: Vec<usize> = (0..len).filter(|&p| !forced(p)).collect();
                        rest.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                        let mut set: Vec<usize> = (0..len).filter(|&p| forced(p)).collect();
                        set.extend(&rest[..share - set.len()]);
                        set.sort_unstable();
                        set
                    })
                    .collect()
            })
            .collect();
        assert_eq!(compressed(&m, &snapkv::METHOD, &ids), expected, "{name}");
    }
}

#[test]
fn streaming_keeps_the_sinks_and_the_last_tokens() {
    let m = load_model("qwen2");
    let ids = m.tokenizer.context_ids(&text()).unwrap();
    let len = ids.len();
    let recent = len.div_ceil(RATIO) - 4;
    let expected: Vec<usize> = (0..4).chain(len - recent..len).collect();
    for set in compressed(&m, &streaming::METHOD, &ids).iter().flatten() {
        assert_eq!(set, &expected);
    }
}

#[test]
fn progress_adds_up_to_the_work_and_moves_before_the_first_chunk() {
    let m = load_model("llama3");
    let ids = m.tokenizer.context_ids(&text()).unwrap();
    for method in [
        &full::METHOD,
        &uniform::METHOD,
        &kvzip::METHOD,
        &snapkv::METHOD,
        &streaming::METHOD,
    ] {
        let done = std::cell::Cell::new(0u64);
        let report = |tokens| done.set(done.get() + tokens);
        let compressor = Compressor::new(&m.decoder, strategy(&m, Request::new(method), ids.len()))
            .with_progress(&report);
        let mut at_first_chunk = None;
        compressor
            .compress(&ids, |_| {
                at_first_chunk.get_or_insert(done.get());
                Ok(())
            })
            .unwrap();
        assert_eq!(
            done.get(),
            compressor.strategy().work(ids.len()),
            "{method:?}"
        );
        // A chunked compressor reports each chunk before it emits it; a
        // selector runs the whole context before it emits anything.
        let first = match method {
            m if m == &full::METHOD || m == &uniform::METHOD => CHUNK.min(ids.len()),
            _ => ids.len(),
        };
        assert!(at_first_chunk.unwrap() >= first as u64, "{method:?}");
    }
    let kvzip = strategy(&m, Request::new(&kvzip::METHOD), ids.len());
    assert_eq!(kvzip.work(ids.len()), 2 * ids.len() as u64 - 4);
}
