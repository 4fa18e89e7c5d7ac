#!/usr/bin/env python3
"""The step `sac train --stage qa` takes, in HF transformers + PEFT, for a speed comparison.

    .venv/bin/python scripts/bench_train_hf.py --data qa.jsonl --steps 3 --grad-accum 8 \
        [--ratio 4] [--lora-rank 16] [--threads 2] [--attn eager|sdpa]

SmolLM2-135M-Instruct (the GGUF of scripts/fetch_smollm2.sh, dequantized to f32 by
transformers), SAC's QA step as sac computes it: per sample, the context (BOS, "### Context:\\n",
the text) in chunks of 510 with an anchor every `ratio` tokens, role embeddings added to the
anchors, attention fully visible within the chunk, PEFT LoRA on q_proj/v_proj (scale 2); the
anchors' K/V of every layer become the past of the frozen decoder (LoRA disabled), which reads
[LM] at position L, the question prompt and the answer, scored on the answer and EOS. Samples
run one after another, their losses summed into one backward pass per sample, AdamW after
`grad_accum` samples. Rows are taken in file order. Prints one JSON line per step: tokens
(context + prompt + target, as sac's log counts them), seconds, tokens/s, loss.

Only the speed is compared: the initialisation and data order differ from sac's.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "target", "models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHUNK = 510
NEG = torch.finfo(torch.float32).min


def chunks(length: int):
    """(start, end), 1-based inclusive positions of the context's chunks."""
    return [(c * CHUNK + 1, min((c + 1) * CHUNK, length)) for c in range(math.ceil(length / CHUNK))]


def anchors(start: int, end: int, ratio: int) -> list[int]:
    first = start + (ratio - 1) // 2
    if first > end:
        first = start
    return list(range(first, end + 1, ratio))


def sample_loss(model, tok, row, role, special, ratio):
    emb = model.get_input_embeddings()
    ids = [tok.bos_token_id] + tok.encode("### Context:\n" + row["context"], add_special_tokens=False)
    prompt = tok.encode("\n### Question:\n" + row["question"] + "\n### Answer:\n", add_special_tokens=False)
    target = tok.encode(row["answer"], add_special_tokens=False) + [tok.eos_token_id]
    layers = model.base_model.model.config.num_hidden_layers
    per_layer = [[] for _ in range(layers)]
    for start, end in chunks(len(ids)):
        anc = anchors(start, end, ratio)
        local = torch.tensor(anc) - start
        x = emb(torch.tensor(ids[start - 1 : end])[None])
        bump = torch.zeros_like(x)
        bump[0, local] = role[: len(anc)]
        n = end - start + 1
        out = model(
            inputs_embeds=x + bump,
            position_ids=torch.arange(start, end + 1)[None],
            attention_mask=torch.zeros(1, 1, n, n),
            use_cache=True,
        )
        for i in range(layers):
            layer = out.past_key_values.layers[i]
            per_layer[i].append((layer.keys[:, :, local], layer.values[:, :, local]))
    past = [(torch.cat([k for k, _ in l], 2), torch.cat([v for _, v in l], 2)) for l in per_layer]
    cache = DynamicCache(ddp_cache_data=past)
    n_past = past[0][0].shape[2]
    read = prompt + target[:-1]
    x = torch.cat([special[1][None], emb(torch.tensor(read))])[None]
    m = x.shape[1]
    mask = torch.zeros(m, n_past + m)
    mask[:, n_past:] = torch.full((m, m), NEG).triu(1)
    first = len(ids)  # [LM] at L, the prompt from L + 1
    with model.disable_adapter():
        logits = model(
            inputs_embeds=x,
            position_ids=torch.arange(first, first + m)[None],
            attention_mask=mask[None, None],
            past_key_values=cache,
        ).logits[0]
    scored = logits[m - len(target) :]
    loss = torch.nn.functional.cross_entropy(scored, torch.tensor(target))
    return loss, len(ids) + len(prompt) + len(target)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                   help="transformers' attention: materialised scores, or torch's fused SDPA kernel")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    base = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, gguf_file=GGUF, dtype=torch.float32, attn_implementation=a.attn
    )
    for param in base.parameters():
        param.requires_grad_(False)
    model = get_peft_model(
        base,
        LoraConfig(
            r=a.lora_rank,
            lora_alpha=2 * a.lora_rank,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
        ),
    )
    hidden = base.config.hidden_size
    mem = math.ceil(CHUNK / a.ratio)
    role = torch.nn.Parameter(0.02 * torch.randn(mem, hidden))
    special = torch.nn.Parameter(0.05 * torch.randn(2, hidden))
    trainable = [role, special] + [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    rows = [json.loads(line) for line in open(a.data) if line.strip()]
    need = a.steps * a.grad_accum
    if len(rows) < need:
        sys.exit(f"{a.data} has {len(rows)} rows, {need} are needed")
    for step in range(a.steps):
        started = time.perf_counter()
        tokens, total = 0, 0.0
        for row in rows[step * a.grad_accum : (step + 1) * a.grad_accum]:
            loss, n = sample_loss(model, tok, row, role, special, a.ratio)
            (loss / a.grad_accum).backward()
            tokens += n
            total += loss.item() / a.grad_accum
        if role.grad is None or not role.grad.abs().sum() > 0:
            sys.exit("no gradient reached the role embeddings through the anchors' K/V")
        torch.nn.utils.clip_grad_norm_(trainable, 2.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - started
        print(json.dumps({"step": step + 1, "tokens": tokens, "seconds": round(seconds, 2),
                          "tokens_per_s": round(tokens / seconds, 1), "loss": round(total, 4)}),
              flush=True)


if __name__ == "__main__":
    main()
