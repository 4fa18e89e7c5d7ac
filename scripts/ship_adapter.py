#!/usr/bin/env python3
"""Copies a trained adapter directory for shipping: tensors in bf16, `base_model` rewritten.

    .venv/bin/python scripts/ship_adapter.py target/sac31/p4 assets/sac-smollm2-r4 \
        --base-model ../../target/models/SmolLM2-135M-Instruct.Q4_1.gguf

`sac train` writes f32 tensors and the model path it was given; a shipped adapter is half
the size in bf16 (sac casts it to the compute dtype on load) and names its model relative
to its own directory, which `sac compress --adapter` resolves. The base model's fingerprint
is kept: the adapter still refuses any other model.
"""

import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--base-model", required=True, help="written as the config's base_model")
    a = p.parse_args()
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(os.path.join(a.src, WEIGHTS)).items()}
    with open(os.path.join(a.src, CONFIG)) as f:
        config = json.load(f)
    config["base_model"] = a.base_model
    os.makedirs(a.dst, exist_ok=True)
    save_file(tensors, os.path.join(a.dst, WEIGHTS))
    with open(os.path.join(a.dst, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    print(f"{a.dst}: {len(tensors)} tensors, {os.path.getsize(os.path.join(a.dst, WEIGHTS))} bytes")


if __name__ == "__main__":
    main()
