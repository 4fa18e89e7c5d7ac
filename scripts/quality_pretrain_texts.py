#!/usr/bin/env python3
"""Pretraining texts for long `sac train --stage pretrain` runs on the quality
benchmark's task, outside the bench (docs/benchmarks.md, "Thousands of
pretraining steps"):

    python3 scripts/quality_pretrain_texts.py TEXTS MIN_PEOPLE MAX_PEOPLE SEED > pretrain.jsonl

Each line is {"text": ...}: every fact of MIN..MAX people drawn from the
benchmark's training names (never its test names), in a random order, then
all of them again in another order, as the bench's own `--adapter-pretrain-steps`
texts are. With `--min-context 400` every cut falls in the second telling, so
each name and value of the continuation can only be predicted by finding its
fact in the compressed context. The names and facts follow benches/quality/data.rs.
"""
import json
import random
import sys

SYLLABLES = "ka lo mi ren tu sa vo ni bel dor fa gi ha jo ki lu mar nor pe qui ros ti wen zo".split()
ATTRIBUTES = [
    ("{n} lives in {v}.", "paris london cairo lima oslo tokyo dublin madrid quito delhi perth rome"),
    ("{n} works as a {v}.", "baker doctor farmer pilot sailor teacher painter singer writer driver nurse tailor"),
    ("The favourite colour of {n} is {v}.", "red blue green yellow black white orange purple grey pink brown gold"),
    ("{n} has a pet {v}.", "cat dog horse parrot rabbit goat fish mouse owl snake frog duck"),
    ("{n} likes to eat {v}.", "bread rice apples cheese soup beans cake pasta eggs plums nuts honey"),
]


def training_names():
    names = []
    for a in SYLLABLES:
        for b in SYLLABLES:
            names.append(a + b)
            for c in SYLLABLES:
                names.append(a + b + c)
    # One name in five is held out for the test documents.
    return [n.capitalize() for i, n in enumerate(names) if i % 5 != 0]


def main(texts: int, low: int, high: int, seed: int) -> None:
    names = training_names()
    rng = random.Random(seed)
    for _ in range(texts):
        people = rng.sample(names, rng.randint(low, high))
        facts = [t.replace("{n}", p).replace("{v}", rng.choice(v.split())) for p in people for t, v in ATTRIBUTES]
        rng.shuffle(facts)
        again = facts[:]
        rng.shuffle(again)
        print(json.dumps({"text": " ".join(facts + again)}))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5]))
