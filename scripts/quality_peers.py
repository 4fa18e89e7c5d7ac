#!/usr/bin/env python3
"""The peers' rows of the quality benchmark (benches/quality): the same
token ids through HF transformers with the whole document, and through
NVIDIA kvpress's presses, query-agnostic.

`cargo bench --bench quality` writes OUT/prompts.json: per layout, every
document's context ids and every question's ids (SQuAD v1.1 dev, CC BY-SA
4.0), the EOS ids, the stop string and the answer length. For each press and
ratio r this script prefills each context once under the press at
compression ratio 1 - 1/r (no press: the whole context), then answers every
question from that cache the way kvpress's pipeline does (greedy; question at
the positions after the context), 16 questions at a time, each reading its own
copy of the cache (`--batch`; a cache as long as the document, as
transformers' and KVzipPress's, one question at a time), cuts the answer at
the stop string, and writes JSON lines {"row", "layout",
"ratio", "id", "answer"} that the bench scores with `--peers FILE`.

Run from the repository root (kvpress 0.5.5 pins transformers below 5.3; this
venv takes torch from the fixtures' .venv, see scripts/requirements-peers.txt):

    python3 -m venv .venv-kvpress
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-kvpress/lib/python3.11/site-packages/zz_main_venv.pth
    .venv-kvpress/bin/pip install -r scripts/requirements-peers.txt
    OMP_WAIT_POLICY=passive .venv-kvpress/bin/python scripts/quality_peers.py target/quality/prompts.json \
        --ratios 4,16 -o target/quality/peers.jsonl
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

MODELS = "target/models"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def press_for(name, ratio):
    """kvpress's press `name` keeping 1/ratio of the context, or None."""
    if name == "none":
        return None
    from kvpress import KVzipPress, RandomPress, SnapKVPress, StreamingLLMPress

    compression = 1.0 - 1.0 / ratio
    return {
        "kvzip": lambda: KVzipPress(compression_ratio=compression),
        "snapkv": lambda: SnapKVPress(compression_ratio=compression),
        "streaming": lambda: StreamingLLMPress(compression_ratio=compression),
        "random": lambda: RandomPress(compression_ratio=compression, seed=0),
    }[name]()


ROW = {
    "none": "transformers full",
    "kvzip": "kvpress KVzipPress",
    "snapkv": "kvpress SnapKVPress",
    "streaming": "kvpress StreamingLLMPress",
    "random": "kvpress RandomPress",
}


def batch_cache(cache, rows):
    """`cache` (batch 1) repeated for `rows` questions, as a new cache."""
    batched = copy.deepcopy(cache)
    for layer in batched.layers:
        layer.keys = layer.keys.repeat(rows, 1, 1, 1)
        layer.values = layer.values.repeat(rows, 1, 1, 1)
    return batched


def mask_keys(model, masked, rows):
    """Heads' evicted keys (KVzipPress masks them instead of dropping them,
    `module.masked_key_indices`, found at batch 1) for every row of a batch."""
    for layer, indices in zip(model.model.layers, masked):
        if indices is None:
            layer.self_attn.masked_key_indices = None
            continue
        batch, heads, seq = indices
        n = len(batch)
        layer.self_attn.masked_key_indices = (
            torch.arange(rows).repeat_interleave(n),
            heads.repeat(rows),
            seq.repeat(rows),
        )


def answers(model, tokenizer, cache, context_length, questions, eos, stop, max_tokens, pad):
    """kvpress's `generate_answer` (greedy, the question at the positions
    after the whole context, at most `max_tokens`, ending at EOS) for several
    questions at once: the questions are padded on the left, the padding
    hidden by the attention mask, and every row reads its own copy of the
    compressed cache. Each answer is cut at `stop`."""
    rows, width = len(questions), max(len(q) for q in questions)
    ids = torch.tensor([[pad] * (width - len(q)) + q for q in questions])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in questions])
    position_ids = torch.tensor(
        [[context_length] * (width - len(q)) + list(range(context_length, context_length + len(q))) for q in questions]
    )
    past = cache.get_seq_length()
    cache = batch_cache(cache, rows)
    generated = [[] for _ in questions]
    done = [False] * rows
    attention = torch.cat([torch.ones(rows, past, dtype=torch.long), mask], dim=1)
    for _ in range(max_tokens):
        logits = model(
            input_ids=ids,
            attention_mask=attention,
            past_key_values=cache,
            position_ids=position_ids,
            logits_to_keep=1,
        ).logits
        tokens = logits[:, -1].argmax(dim=-1).tolist()
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if token in eos:
                done[row] = True
                continue
            generated[row].append(token)
            done[row] = stop in tokenizer.decode(generated[row], skip_special_tokens=True)
        if all(done):
            break
        ids = torch.tensor([[t] for t in tokens])
        attention = torch.cat([attention, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return [tokenizer.decode(g, skip_special_tokens=True).split(stop)[0].strip() for g in generated]


def compressed(model, context_ids, name, ratios):
    """The cache of `context_ids` under press `name`, and per ratio the keys
    each head masks (`masked_key_indices`, None where the press drops keys
    instead). KVzipPress is run once at the first ratio; its scores, kept,
    are masked again at the others with its own `compress_post`."""
    cache = DynamicCache()
    press = press_for(name, ratios[0])
    context = torch.tensor([context_ids])
    if press is None:
        model(input_ids=context, past_key_values=cache)
        return cache, {None: [None] * len(model.model.layers)}
    scores = []
    if name == "kvzip":
        compress_post = press.compress_post

        def keep_scores(model):
            scores.append(press.score_val.clone())
            compress_post(model)

        press.compress_post = keep_scores
    with press(model):
        model(input_ids=context, past_key_values=cache)
    masks = {}
    for r in ratios:
        if r != ratios[0]:
            press.score_val, press.compression_ratio = scores[0].clone(), 1.0 - 1.0 / r
            compress_post(model)
        masks[r] = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    press.score_val = None
    return cache, masks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts")
    parser.add_argument("--presses", default="none,kvzip,snapkv,streaming,random")
    parser.add_argument("--ratios", default="2,4,8,16")
    parser.add_argument("--layouts", default="raw")
    parser.add_argument(
        "--batch",
        type=int,
        default=16,
        help="questions answered together from a pruned cache (a whole one, as transformers' and "
        "KVzipPress's: one at a time)",
    )
    parser.add_argument("--only", type=int, help="ask only the first N questions of each document (a check)")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    prompts = json.load(open(args.prompts))
    eos, stop, max_tokens = set(prompts["eos"]), prompts["stop"], prompts["max_tokens"]
    pad = prompts["eos"][0]

    tokenizer = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    # KVzipPress reads the tokenizer (for its chat template) from the
    # model's name, which for a GGUF load is a directory without one.
    saved = tempfile.mkdtemp()
    tokenizer.save_pretrained(saved)
    model.config.name_or_path = saved

    done = set()
    if os.path.exists(args.out):
        for line in open(args.out):
            r = json.loads(line)
            done.add((r["row"], r["layout"], r["ratio"]))
    presses = args.presses.split(",")
    ratios = [int(r) for r in args.ratios.split(",")]
    out = open(args.out, "a")
    for layout in args.layouts.split(","):
        for name in presses:
            todo = [r for r in ([None] if name == "none" else ratios) if (ROW[name], layout, r) not in done]
            # KVzip's scores do not depend on the ratio: each document is
            # scored once and masked at every ratio.
            for group in [todo] if name == "kvzip" and todo else [[r] for r in todo]:
                started = time.time()
                lines = {r: [] for r in group}
                for doc in prompts["layouts"][layout]:
                    with torch.no_grad():
                        cache, masks = compressed(model, doc["context_ids"], name, group)
                        # Padded rows over a whole 2,000-token cache ran 3.5x
                        # slower per question than one at a time here (12 s
                        # against 3.4 s, the same answers): transformers copies
                        # the cache on every step and repeats it per query head.
                        # KVzipPress keeps the whole cache too (it masks keys).
                        size = 1 if name in ("none", "kvzip") else args.batch
                        for r in group:
                            questions = doc["questions"][: args.only]
                            for start in range(0, len(questions), size):
                                batch = questions[start : start + size]
                                mask_keys(model, masks[r], len(batch))
                                texts = answers(
                                    model, tokenizer, cache, len(doc["context_ids"]), [q["ids"] for q in batch],
                                    eos, stop, max_tokens, pad,
                                )
                                for q, text in zip(batch, texts):
                                    row = {"row": ROW[name], "layout": layout, "ratio": r, "id": q["id"], "answer": text}
                                    lines[r].append(json.dumps(row) + "\n")
                    mask_keys(model, [None] * len(model.model.layers), 0)
                # A row is written whole, so that a rerun skips only finished ones.
                for r in group:
                    out.writelines(lines[r])
                    out.flush()
                    print(f"{ROW[name]} {layout} r{r}: {len(lines[r])} answers", file=sys.stderr)
                print(f"  {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
