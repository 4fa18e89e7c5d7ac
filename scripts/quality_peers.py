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
the positions after the context; the answer's K/V dropped after each), cuts
the answer at the stop string, and writes JSON lines {"row", "layout",
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


def answer(model, tokenizer, cache, context_length, question_ids, eos, stop, max_tokens):
    """kvpress's `generate_answer`, with the answer's K/V dropped after."""
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    ids = torch.tensor([question_ids])
    position_ids = torch.arange(context_length, context_length + ids.shape[1]).unsqueeze(0)
    generated = []
    for _ in range(max_tokens):
        logits = model(input_ids=ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if stop in text:
            break
        ids = torch.tensor([[token]])
        position_ids = position_ids[:, -1:] + 1
    for layer, length in zip(cache.layers, lengths):
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]
    return tokenizer.decode(generated, skip_special_tokens=True).split(stop)[0].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts")
    parser.add_argument("--presses", default="none,kvzip,snapkv,streaming,random")
    parser.add_argument("--ratios", default="2,4,8,16")
    parser.add_argument("--layouts", default="raw")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    prompts = json.load(open(args.prompts))
    eos, stop, max_tokens = set(prompts["eos"]), prompts["stop"], prompts["max_tokens"]

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
    # Every ratio of one press before the next ratio: the lowest ratios of
    # all presses come first.
    configs = [("none", None)] * ("none" in presses) + [(p, r) for r in ratios for p in presses if p != "none"]
    out = open(args.out, "a")
    for layout in args.layouts.split(","):
        for name, ratio in configs:
            if (ROW[name], layout, ratio) in done:
                continue
            started = time.time()
            lines = []
            for doc in prompts["layouts"][layout]:
                context = torch.tensor([doc["context_ids"]])
                cache = DynamicCache()
                press = press_for(name, ratio)
                with torch.no_grad():
                    if press is None:
                        model(input_ids=context, past_key_values=cache)
                    else:
                        with press(model):
                            model(input_ids=context, past_key_values=cache)
                    for q in doc["questions"]:
                        text = answer(model, tokenizer, cache, context.shape[1], q["ids"], eos, stop, max_tokens)
                        row = {"row": ROW[name], "layout": layout, "ratio": ratio, "id": q["id"], "answer": text}
                        lines.append(json.dumps(row) + "\n")
            # A row is written whole, so that a rerun skips only finished ones.
            out.writelines(lines)
            out.flush()
            print(f"{ROW[name]} {layout} r{ratio}: {len(lines)} answers, {time.time() - started:.0f} s", file=sys.stderr)

if __name__ == "__main__":
    main()
