#!/usr/bin/env python3
"""Benchmark HuggingFace transformers prefill on CPU for a Llama-3.2-1B-shaped model.

Random weights (no download), f32. Prints one JSON line, e.g.

    .venv/bin/python scripts/bench_hf_prefill.py --threads 2 --tokens 512 --repeats 3

Timing covers one full forward pass over `--tokens` tokens (batch 1) under
torch.inference_mode(), after one untimed warm-up pass. By default logits are computed
for every position (as a per-token-scoring prefill needs); `--logits-to-keep 1` makes HF
compute only the last position's logits (what a generate() prefill does).
"""

import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def llama32_1b_config(attn: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=128000,
        eos_token_id=128001,
        attn_implementation=attn,
    )


def build_model(cfg: LlamaConfig, seed: int) -> LlamaForCausalLM:
    # Construct on the meta device (no allocation, no init), then materialise
    # uninitialised storage and fill it ourselves: much faster than HF's per-module init.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    # Filling 1.2e9 values with normal_() takes ~20 s on 2 cores; instead tile a pool of
    # 2^22 N(0, 0.02) values (odd offsets per tensor). Values don't affect the timing.
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=g) * 0.02
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            off = (i * 7919) % pool.numel()
            src = torch.cat([pool[off:], pool[:off]])
            for start in range(0, flat.numel(), src.numel()):
                n = min(src.numel(), flat.numel() - start)
                flat[start:start + n].copy_(src[:n])
    # non-persistent buffers (RoPE inv_freq) are garbage after to_empty: rebuild them
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--logits-to-keep", type=int, default=0,
                    help="0 = logits for all positions (default); 1 = last position only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = llama32_1b_config(args.attn)

    t0 = time.perf_counter()
    model = build_model(cfg, args.seed)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=g)

    def once() -> float:
        t = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=args.logits_to_keep)
        _ = out.logits[0, -1, 0].item()  # make sure everything is materialised
        return time.perf_counter() - t

    times = []
    with torch.inference_mode():
        warmup_s = once()
        for _ in range(args.repeats):
            times.append(once())

    median = statistics.median(times)
    print(json.dumps({
        "impl": "hf-transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "tokens": args.tokens,
        "dtype": "f32",
        "best_s": round(min(times), 4),
        "median_s": round(median, 4),
        "tokens_per_s": round(args.tokens / median, 2),
        "attn": args.attn,
        "logits_to_keep": args.logits_to_keep,
        "repeats": args.repeats,
        "times_s": [round(t, 4) for t in times],
        "warmup_s": round(warmup_s, 4),
        "init_s": round(init_s, 2),
        "params": n_params,
    }), flush=True)


if __name__ == "__main__":
    main()
