#!/usr/bin/env python3
"""What the untrained SmolLM2 scores on the training objectives, as yardsticks for the loss curves.

    .venv/bin/python scripts/loss_baselines.py qa        # SAC's qa loss: answer + EOS
    .venv/bin/python scripts/loss_baselines.py restate   # GMSA's autoencoding loss: text + EOS

HF transformers with the GGUF of scripts/fetch_smollm2.sh dequantized to f32, on the first 40
rows of target/sac31/qa-train.jsonl or paragraphs.jsonl (scripts/squad_train_data.py; SQuAD,
CC BY-SA 4.0), in sac's raw layout. Mean per-token cross-entropy of the scored tokens,
averaged over rows:

    qa       "whole context": BOS, "### Context:\\n" + paragraph, the question prompt, the answer;
             "closed book": BOS, the question prompt, the answer.
    restate  "nothing": "Restate the aforementioned Text.", the text;
             "the text itself": BOS, "### Context:\\n" + text, the prompt, the text.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "target", "sac31")
RESTATE = "Restate the aforementioned Text."
ROWS = 40


def loss(model, before: list[int], target: list[int]) -> float:
    ids = before + target
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits[len(before) - 1 : -1], -1)
    return -logp[torch.arange(len(target)), torch.tensor(target)].mean().item()


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind not in ("qa", "restate"):
        sys.exit(__doc__)
    torch.set_num_threads(os.cpu_count())
    models = os.path.join(ROOT, "target", "models")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(models, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(models, gguf_file=gguf, dtype=torch.float32).eval()
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    context = lambda text: [tok.bos_token_id] + enc("### Context:\n" + text)  # noqa: E731
    eos = tok.eos_token_id
    scores: dict[str, list[float]] = {}
    if kind == "qa":
        rows = [json.loads(line) for line in open(os.path.join(DATA, "qa-train.jsonl"))][:ROWS]
        for r in rows:
            prompt = enc("\n### Question:\n" + r["question"] + "\n### Answer:\n")
            answer = enc(r["answer"]) + [eos]
            scores.setdefault("whole context", []).append(
                loss(model, context(r["context"]) + prompt, answer))
            scores.setdefault("closed book", []).append(
                loss(model, [tok.bos_token_id] + prompt, answer))
    else:
        rows = [json.loads(line)["text"] for line in open(os.path.join(DATA, "paragraphs.jsonl"))][:ROWS]
        for text in rows:
            target = enc(text) + [eos]
            scores.setdefault("nothing", []).append(loss(model, enc(RESTATE), target))
            scores.setdefault("the text itself", []).append(
                loss(model, context(text) + enc(RESTATE), target))
    for name, values in scores.items():
        print(f"{kind}, {name}: {sum(values) / len(values):.3f} over {len(values)} rows")


if __name__ == "__main__":
    main()
