#!/usr/bin/env python3
"""Generate HF-transformers reference fixtures for the Rust decoder parity tests.

Run from the repository root:

    .venv/bin/python scripts/make_fixtures.py

Writes tests/fixtures/parity/{llama3,qwen2,qwen3,mistral}/ — each a self-contained
HF model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) plus reference.safetensors with the expected outputs.
Pinned package versions: scripts/requirements-fixtures.txt.  Everything is seeded and
run single-threaded so a re-run reproduces the same bytes (same versions, same CPU).
"""

import copy
import json
import math
import os
import shutil
import sys

import torch
import transformers
import tokenizers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity")

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
VOCAB_SIZE = 300  # total, including the two special tokens (appended last, like Llama 3)
T = 16  # sequence length of the fixed input
N_PREFILL = T - 5  # "steps" case: prefill this many, then 5 single-token steps
BLOCK = (3, 11)  # "bidir" case: [start, end) 0-based block that attends bidirectionally

# Tiny dims, chosen so that tests/fixtures stays ~1 MB in total.
HIDDEN = 32
N_HEADS = 4
N_KV_HEADS = 2  # GQA, 2 query heads per KV head
INTERMEDIATE = 96
N_LAYERS = 2
QWEN3_HEAD_DIM = 16  # != HIDDEN / N_HEADS (= 8): q/o are 32<->64, k/v 32->32
INIT_STD = 0.1

CORPUS = """\
The river ran slowly past the old mill, carrying leaves and small branches down toward the sea.
In the morning the fishermen walked along the bank, talking about the weather and the price of bread.
Nobody in the village could remember when the mill had last turned, but everyone agreed it was a fine place to sit.

A good document is short, clear and honest. It tells the reader what they need to know, and then it stops.
Long sentences are not always bad, but they should earn their length; every word must carry some weight.
When you compress a text for a language model, you keep the facts, the names and the numbers, and you drop the rest.

The cat sat on the warm stone wall and watched the birds in the garden. It did not move for a long time.
Then, quite suddenly, it jumped down, crossed the grass in three quick steps, and disappeared under the hedge.
The birds flew up into the apple tree and began to sing again, as if nothing at all had happened.

Numbers matter too: the train left at 7:45, arrived at 10:30, and cost 12 pounds for a return ticket.
Some of the passengers read the newspaper, some slept, and a few of them looked out of the window at the fields.
By the time they reached the city, the rain had stopped and the streets were shining in the afternoon sun.
"""

SENTENCE = "The cat sat by the river and watched the fishermen walk along the bank in the morning."


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 2,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = [l for l in CORPUS.splitlines() if l.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE - 2, tok.get_vocab_size()
    tok.add_special_tokens([BOS, EOS])  # -> ids VOCAB_SIZE-2, VOCAB_SIZE-1
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def tokenizer_config(bos_id: int, eos_id: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "added_tokens_decoder": {
            str(bos_id): {"content": BOS, "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True},
            str(eos_id): {"content": EOS, "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True},
        },
    }


def make_input_ids(tok: Tokenizer) -> list[int]:
    ids = tok.encode(SENTENCE).ids  # post-processor prepends BOS
    bos_id = tok.token_to_id(BOS)
    assert ids[0] == bos_id and bos_id not in ids[1:], ids
    assert len(ids) >= T, f"sentence encodes to only {len(ids)} tokens"
    return ids[:T]


# --------------------------------------------------------------------------- models


def common(vocab: int, bos_id: int, eos_id: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        initializer_range=INIT_STD,
        attention_dropout=0.0,
    )


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # head_dim 8, theta 5e5 -> wavelengths 6.3, 167, 4.5e3, 1.2e5. With 256 the
    # thresholds are 64 (high) / 256 (low): one freq kept, one smoothed, two divided.
    "original_max_position_embeddings": 256,
}


def make_configs(vocab: int, bos_id: int, eos_id: int) -> dict:
    c = lambda: common(vocab, bos_id, eos_id)  # noqa: E731
    return {
        "llama3": LlamaConfig(
            **c(),
            rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE},
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
        ),
        "qwen2": Qwen2Config(
            **c(),
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
            use_sliding_window=False,
            sliding_window=None,
        ),
        "qwen3": Qwen3Config(
            **c(),
            head_dim=QWEN3_HEAD_DIM,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
        ),
        "mistral": MistralConfig(
            **c(),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    }


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Explicit, seeded init of every parameter (tied params are visited once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # all RMSNorms incl. qwen3 q_norm/k_norm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):  # qwen2 q/k/v biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                # larger std so that logits have a spread of a few units
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=g))


def build_model(name: str, cfg) -> torch.nn.Module:
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    randomise(model, seed=sum(map(ord, name)) * 7919)
    model.eval()
    return model


def legacy_rope_keys(config_path: str) -> None:
    """transformers 5 writes only `rope_parameters` (with rope_theta inside) and `dtype`.
    Checkpoints on the Hub (and older transformers) use top-level `rope_theta` +
    `rope_scaling` and `torch_dtype`. Add those too, so the config parses with either convention; transformers 5 still reloads it
    identically (checked by the reload below)."""
    with open(config_path) as f:
        cfg = json.load(f)
    rp = dict(cfg["rope_parameters"])
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])  # pre-v5 name of the same key
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- running


def cache_kv(cache, layer: int):
    if hasattr(cache, "layers"):
        k, v = cache.layers[layer].keys, cache.layers[layer].values
    elif hasattr(cache, "key_cache"):
        k, v = cache.key_cache[layer], cache.value_cache[layer]
    else:
        k, v = cache[layer]
    assert k.shape[0] == 1 and v.shape[0] == 1
    return k[0].detach().clone(), v[0].detach().clone()


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """bool [T,T] (True = may attend) -> f32 additive mask [T,T]."""
    neg = torch.finfo(torch.float32).min
    return torch.where(allowed, torch.tensor(0.0), torch.tensor(neg)).to(torch.float32)


def causal_allowed(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def bidir_allowed(t: int, lo: int, hi: int) -> torch.Tensor:
    a = causal_allowed(t)
    a[lo:hi, lo:hi] = True
    return a


@torch.no_grad()
def run(model, ids, pos, mask2d=None):
    """Returns (logits [T,V], hidden [T,H], cache) for one sequence."""
    kw = dict(input_ids=ids[None], position_ids=pos[None], use_cache=True)
    if mask2d is not None:
        kw["attention_mask"] = mask2d[None, None].to(model.dtype)
    out = model(**kw, output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    # cross-check against the decoder's last_hidden_state (post final norm)
    base = model.model(**{k: v for k, v in kw.items()})
    torch.testing.assert_close(base.last_hidden_state[0], hidden, rtol=0, atol=0)
    return out.logits[0].float(), hidden.float(), out.past_key_values


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def make_reference(name: str, model, input_ids: torch.Tensor) -> dict:
    cfg = model.config
    ref = {"input_ids": input_ids.clone()}
    pos0 = torch.arange(T, dtype=torch.int64)
    pos1 = torch.arange(1, T + 1, dtype=torch.int64)

    # ---- causal
    logits, hidden, cache = run(model, input_ids, pos0)
    ref["causal.position_ids"] = pos0
    ref["causal.logits"] = logits
    ref["causal.hidden"] = hidden
    for i in range(cfg.num_hidden_layers):
        ref[f"causal.k.{i}"], ref[f"causal.v.{i}"] = cache_kv(cache, i)
    # logits must be lm_head(hidden)
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=1e-6, atol=1e-6)
    # sanity: logits are not degenerate
    assert logits.std().item() > 0.3, f"{name}: logits too flat ({logits.std().item():.3g})"

    # ---- 4D-mask check (1): an explicit causal additive mask reproduces the default path
    l_cm, h_cm, c_cm = run(model, input_ids, pos0, additive(causal_allowed(T)))
    d = maxdiff(l_cm, logits)
    log(f"  [{name}] explicit 4D causal mask vs default: max|dlogits| = {d:.3g}")
    assert d <= 1e-6, d
    for i in range(cfg.num_hidden_layers):
        assert maxdiff(cache_kv(c_cm, i)[0], ref[f"causal.k.{i}"]) <= 1e-6

    # ---- bidir (1-based positions, block [3,11) bidirectional)
    mask = additive(bidir_allowed(T, *BLOCK))
    b_logits, b_hidden, b_cache = run(model, input_ids, pos1, mask)
    ref["bidir.position_ids"] = pos1
    ref["bidir.mask"] = mask
    ref["bidir.logits"] = b_logits
    ref["bidir.hidden"] = b_hidden
    for i in range(cfg.num_hidden_layers):
        ref[f"bidir.k.{i}"], ref[f"bidir.v.{i}"] = cache_kv(b_cache, i)

    # ---- 4D-mask check (2): the bidir mask is really honoured. Compare with a causal
    # run at the SAME positions: rows before the block must agree, rows inside differ.
    c1_logits, _, c1_cache = run(model, input_ids, pos1, additive(causal_allowed(T)))
    lo, hi = BLOCK
    d_before = maxdiff(b_logits[:lo], c1_logits[:lo])
    d_block = [maxdiff(b_logits[j], c1_logits[j]) for j in range(lo, hi)]
    d_after = [maxdiff(b_logits[j], c1_logits[j]) for j in range(hi, T)]
    log(f"  [{name}] bidir vs causal @pos 1..T: before block {d_before:.3g}, "
        f"in block min {min(d_block):.3g}, after block min {min(d_after):.3g}")
    assert d_before <= 1e-6, d_before
    assert min(d_block) > 1e-3, d_block
    assert min(d_after) > 1e-4, d_after
    # also vs the plain causal reference (positions 0..T-1), as asked for
    assert min(maxdiff(b_logits[j], logits[j]) for j in range(lo, hi)) > 1e-3
    # RoPE is relative: shifting all positions by 1 leaves causal logits (almost) unchanged,
    # but the cached K (after RoPE) must differ.
    log(f"  [{name}] causal logits pos 1..T vs 0..T-1: {maxdiff(c1_logits, logits):.3g} "
        f"(RoPE is shift-invariant); K.0 differs by {maxdiff(cache_kv(c1_cache, 0)[0], ref['causal.k.0']):.3g}")
    assert maxdiff(cache_kv(c1_cache, 0)[0], ref["causal.k.0"]) > 1e-3

    # ---- steps: prefill N_PREFILL tokens, then 5 single-token calls with the cache
    n = N_PREFILL
    out = model(input_ids=input_ids[None, :n], position_ids=pos0[None, :n], use_cache=True)
    cache = out.past_key_values
    ref["steps.prefill_logits"] = out.logits[0].float()
    step_logits = []
    for t in range(n, T):
        out = model(input_ids=input_ids[None, t:t + 1], position_ids=pos0[None, t:t + 1],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        step_logits.append(out.logits[0, 0].float())
    ref["steps.step_logits"] = torch.stack(step_logits)
    for i in range(cfg.num_hidden_layers):
        ref[f"steps.k.{i}"], ref[f"steps.v.{i}"] = cache_kv(cache, i)
    d_pre = maxdiff(ref["steps.prefill_logits"], logits[:n])
    d_step = maxdiff(ref["steps.step_logits"], logits[n:])
    d_k = max(maxdiff(ref[f"steps.k.{i}"], ref[f"causal.k.{i}"]) for i in range(cfg.num_hidden_layers))
    log(f"  [{name}] steps vs causal: prefill {d_pre:.3g}, steps {d_step:.3g}, cache K {d_k:.3g}")
    assert d_pre <= 1e-5 and d_step <= 1e-5 and d_k <= 1e-5, (d_pre, d_step, d_k)

    # ---- bf16 causal
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    out = m16(input_ids=input_ids[None], position_ids=pos0[None], use_cache=False)
    ref["causal.logits_bf16"] = out.logits[0].float()
    log(f"  [{name}] bf16 vs f32 causal logits: max|d| = {maxdiff(ref['causal.logits_bf16'], logits):.3g} "
        f"(logit std {logits.std().item():.3g})")

    # shapes
    V, H, KV = cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    for case in ("causal", "bidir", "steps"):
        for i in range(cfg.num_hidden_layers):
            for kv in "kv":
                assert tuple(ref[f"{case}.{kv}.{i}"].shape) == (KV, T, hd)
    assert tuple(ref["causal.logits"].shape) == (T, V)
    assert tuple(ref["causal.hidden"].shape) == (T, H)
    assert tuple(ref["bidir.mask"].shape) == (T, T)
    assert tuple(ref["steps.prefill_logits"].shape) == (n, V)
    assert tuple(ref["steps.step_logits"].shape) == (5, V)

    out_ref = {}
    for k, v in ref.items():
        v = v.detach().contiguous()
        if v.is_floating_point():
            v = v.to(torch.float32)
        else:
            v = v.to(torch.int64)
        out_ref[k] = v
    return out_ref


def print_llama3_inv_freq(model) -> None:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    scaled = model.model.rotary_emb.inv_freq.float()
    orig = LLAMA3_ROPE["original_max_position_embeddings"]
    log(f"  [llama3] head_dim {hd}, theta {theta}, original_max {orig} "
        f"(high_freq_wavelen {orig / LLAMA3_ROPE['high_freq_factor']}, "
        f"low_freq_wavelen {orig / LLAMA3_ROPE['low_freq_factor']})")
    kinds = []
    for p, s in zip(plain.tolist(), scaled.tolist()):
        r = p / s
        kind = "kept" if abs(r - 1) < 1e-6 else ("divided" if abs(r - LLAMA3_ROPE["factor"]) < 1e-4 else "smoothed")
        kinds.append(kind)
        log(f"    wavelen {2 * math.pi / p:10.1f}  inv_freq {p:.6e} -> {s:.6e}  (/{r:.4f}, {kind})")
    assert {"kept", "smoothed", "divided"} <= set(kinds), kinds


# --------------------------------------------------------------------------- main


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")

    tok = build_tokenizer()
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert vocab == VOCAB_SIZE and (bos_id, eos_id) == (VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    input_ids = torch.tensor(make_input_ids(tok), dtype=torch.int64)
    log(f"vocab {vocab}, bos {bos_id}, eos {eos_id}")
    log(f"input_ids {input_ids.tolist()}")
    log(f"  = {[tok.id_to_token(i) for i in input_ids.tolist()]}")

    if os.path.isdir(OUT):
        for d in ("llama3", "qwen2", "qwen3", "mistral"):
            shutil.rmtree(os.path.join(OUT, d), ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)

    for name, cfg in make_configs(vocab, bos_id, eos_id).items():
        log(f"== {name}")
        d = os.path.join(OUT, name)
        model = build_model(name, cfg)
        if name == "llama3":
            print_llama3_inv_freq(model)
        if name == "qwen2":
            assert all(model.model.layers[0].self_attn.q_proj.bias.abs() > 0)
        if name == "qwen3":
            a = model.model.layers[0].self_attn
            assert tuple(a.q_proj.weight.shape) == (N_HEADS * QWEN3_HEAD_DIM, HIDDEN)
            assert tuple(a.o_proj.weight.shape) == (HIDDEN, N_HEADS * QWEN3_HEAD_DIM)
            assert (a.q_norm.weight != 1).all() and (a.k_norm.weight != 1).all()
        ref = make_reference(name, model, input_ids)

        model.save_pretrained(d, safe_serialization=True)
        legacy_rope_keys(os.path.join(d, "config.json"))
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(bos_id, eos_id), f, indent=2)
            f.write("\n")
        save_file(ref, os.path.join(d, "reference.safetensors"),
                  # a single metadata key: safetensors writes the map in hash order, so more
                  # than one key would make the file bytes differ between runs
                  metadata={"info": f"scripts/make_fixtures.py model={name} torch={torch.__version__} "
                                    f"transformers={transformers.__version__} block={BLOCK[0]},{BLOCK[1]} "
                                    f"n_prefill={N_PREFILL}"})

        # round trip: reload the directory and reproduce the causal logits
        re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        assert re.config.tie_word_embeddings == cfg.tie_word_embeddings
        with torch.no_grad():
            rl = re(input_ids=input_ids[None], position_ids=torch.arange(T)[None]).logits[0]
        log(f"  [{name}] reloaded dir: max|dlogits| = {maxdiff(rl, ref['causal.logits']):.3g}")
        assert maxdiff(rl, ref["causal.logits"]) <= 1e-6
        ht = AutoTokenizer.from_pretrained(d)
        hids = ht(SENTENCE)["input_ids"][:T]
        assert hids == input_ids.tolist(), (hids, input_ids.tolist())
        assert ht.bos_token_id == bos_id and ht.eos_token_id == eos_id

    log("done")


if __name__ == "__main__":
    sys.exit(main())
