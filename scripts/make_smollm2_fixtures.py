#!/usr/bin/env python3
"""Reference numbers for the real model of tests/real_model.rs.

SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_smollm2.sh) on
tests/fixtures/squad/black_death.txt (SQuAD v1.1 dev, CC BY-SA 4.0):

- token ids of the text, from llama.cpp's own tokenizer (llama-cpp-python,
  vocab only), the reference the issue asks for; HF transformers' GGUF
  tokenizer conversion is checked against them for the plain text (it gets
  BOS and EOS wrong for this file, which plain text does not touch);
- logits of HF transformers' LlamaForCausalLM loaded from the same GGUF
  (transformers dequantizes with the gguf package and undoes llama.cpp's
  query/key permutation itself), in f32, fed those ids at positions 0..n-1:
  every vocabulary entry at a few positions, and every position for a
  seeded sample of vocabulary columns (all of them would be 59 MB).

Run from the repository root:

    bash scripts/fetch_smollm2.sh
    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt
    .venv/bin/python scripts/make_smollm2_fixtures.py

Writes tests/fixtures/smollm2/reference.safetensors.
"""

import os
import sys

import numpy as np
import torch
from llama_cpp import Llama
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

MODELS = "target/models"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "tests/fixtures/squad/black_death.txt"
OUT = "tests/fixtures/smollm2/reference.safetensors"
ROWS = 4
COLUMNS = 256


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    text = open(TEXT, encoding="utf-8").read()

    vocab = Llama(os.path.join(MODELS, GGUF), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    hf_tokenizer = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    hf_ids = hf_tokenizer(text, add_special_tokens=False).input_ids
    if hf_ids != ids:
        first = next(i for i, (a, b) in enumerate(zip(ids, hf_ids)) if a != b)
        sys.exit(f"llama.cpp and transformers tokenize differently from token {first}")

    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy().astype(np.float32)

    n, v = logits.shape
    rows = np.linspace(0, n - 1, ROWS).round().astype(np.int64)
    columns = np.sort(np.random.default_rng(0).choice(v, COLUMNS, replace=False)).astype(np.int64)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(
        {
            "ids": np.array(ids, dtype=np.int64),
            "rows": rows,
            "row_logits": np.ascontiguousarray(logits[rows]),
            "columns": columns,
            "column_logits": np.ascontiguousarray(logits[:, columns]),
        },
        OUT,
    )
    print(f"{OUT}: {n} tokens, rows {rows.tolist()}, {COLUMNS} columns")


if __name__ == "__main__":
    main()
