#!/usr/bin/env python3
"""Builds assets/demo from a run of the quality benchmark.

    cargo bench --bench quality            # writes target/quality
    python3 scripts/make_demo_assets.py target/quality

(The shipped demo comes from target/qs11 of docs/benchmarks.md, "Longer qa,
and ratio 8 seeded from ratio 4": the staged base model and a ratio-4
adapter trained with sac train, scored by the bench with --reuse-adapters.)

Copies the base model and the ratio-4 SAC adapter (its base model pointed at
../model, relative to the adapter, so that `sac compress --adapter
assets/demo/adapter` finds it from any working directory), and takes the
shortest test document with one question per attribute about it (answers
beside them).
"""
import json
import re
import shutil
import sys
from pathlib import Path

QUESTIONS = [
    (r"(\w+) lives in (\w+)\.", "Where does {} live?"),
    (r"(\w+) works as a (\w+)\.", "What is the job of {}?"),
    (r"The favourite colour of (\w+) is (\w+)\.", "What is the favourite colour of {}?"),
    (r"(\w+) has a pet (\w+)\.", "What pet does {} have?"),
    (r"(\w+) likes to eat (\w+)\.", "What does {} like to eat?"),
]


def main(run: Path, demo: Path) -> None:
    model, adapter = demo / "model", demo / "adapter"
    model.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]:
        shutil.copyfile(run / "model" / name, model / name)
    shutil.copyfile(run / "adapter-r4" / "adapter.safetensors", adapter / "adapter.safetensors")
    config = json.loads((run / "adapter-r4" / "adapter_config.json").read_text())
    config["base_model"] = "../model"  # relative to the adapter directory
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    contexts = {json.loads(line)["context"] for line in (run / "test.jsonl").open()}
    doc = min(contexts, key=len)
    (demo / "doc.txt").write_text(doc + "\n")
    questions, answers = [], []
    for pattern, question in QUESTIONS:
        name, value = re.search(pattern, doc).groups()
        questions.append(question.format(name))
        answers.append(value)
    (demo / "questions.txt").write_text("\n".join(questions) + "\n")
    (demo / "answers.txt").write_text("\n".join(answers) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent.parent / "assets" / "demo")
