#!/usr/bin/env python3
"""Training data for `sac train` from the benchmark's training articles.

    python3 scripts/squad_train_data.py [OUT_DIR]     (default target/sac31)

The quality benchmark (benches/quality/squad.rs) splits the 36 SQuAD v1.1 dev
articles of ../shared/data/squad-v1.1-dev by article: every third, from the
first, is the "tune" split, the rest "dev", which the tables report on. The
tune articles are the training articles. The last two of them are held apart
for choosing rank, learning rate and steps, so nothing here comes from a dev
article and nothing chosen is chosen on what it trains on.

Writes, as JSON lines:
  pretrain.jsonl   {"text"}: one row per training article, its paragraphs joined
  pretrain-windows.jsonl {"text"}: from every paragraph of the training articles, it
                   and the paragraphs after it up to PRETRAIN_CHARS (`sac train`'s
                   pretraining reads a row from its start, so each paragraph starts one
                   context of up to 2,040 tokens and its continuation)
  paragraphs.jsonl {"text"}: one row per paragraph of the training articles, for
                   GMSA's autoencoding (`sac train --method gmsa`)
  qa-train.jsonl   {"context", "question", "answer"}: every question of those
                   articles on its paragraph, with its first gold answer
  qa-held.jsonl    {"context", "question", "answer": [all gold answers]}: the two
                   held-apart articles, for `sac train --eval`
  qa-train-doc.jsonl, qa-held-doc.jsonl: the same questions, each on a window of
                   consecutive paragraphs of its article as long as the quality
                   benchmark's documents (about 8,000 characters, 2,000 tokens), its
                   own paragraph at a seeded random place in it

The text and questions are SQuAD's (Rajpurkar et al., 2016), CC BY-SA 4.0;
anything derived from these files keeps that attribution and licence.
"""

import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "..", "shared", "data", "squad-v1.1-dev", "paragraphs.jsonl")
HELD = 2
# About the length in characters of the benchmark's 2,000-token documents.
WINDOW_CHARS = 8000
# A little over 2,040 + 256 tokens of this text (about 4 characters a token).
PRETRAIN_CHARS = 10000


def window(paragraphs: list[dict], at: int, rng: random.Random) -> str:
    """Consecutive paragraphs around paragraph `at`, up to WINDOW_CHARS, with `at` placed at
    a random share of the window: paragraphs are added before it until that share is used,
    then after it, then before it again if the article ends first."""
    lengths = [len(p["context"]) for p in paragraphs]
    budget = WINDOW_CHARS - lengths[at]
    lo, hi = at, at + 1

    def grow_before(limit: float) -> int:
        """Adds paragraphs before the window while they fit in `limit`; returns their length."""
        nonlocal lo
        used = 0
        while lo > 0 and used + lengths[lo - 1] <= limit:
            used += lengths[lo - 1]
            lo -= 1
        return used

    budget -= grow_before(rng.random() * budget)
    while hi < len(lengths) and lengths[hi] <= budget:
        budget -= lengths[hi]
        hi += 1
    grow_before(budget)
    return "\n\n".join(p["context"] for p in paragraphs[lo:hi])


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "sac31")
    os.makedirs(out, exist_ok=True)
    articles: dict[str, list[dict]] = {}
    with open(SOURCE) as f:
        for line in f:
            paragraph = json.loads(line)
            articles.setdefault(paragraph["title"], []).append(paragraph)
    tune = [title for i, title in enumerate(articles) if i % 3 == 0]
    train, held = tune[:-HELD], tune[-HELD:]

    def write(name: str, rows) -> int:
        n = 0
        with open(os.path.join(out, name), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                n += 1
        return n

    texts = write(
        "pretrain.jsonl",
        ({"text": "\n\n".join(p["context"] for p in articles[t])} for t in train),
    )
    def following(paragraphs: list[dict], at: int) -> str:
        """Paragraph `at` and those after it while the text stays within PRETRAIN_CHARS."""
        hi, used = at + 1, len(paragraphs[at]["context"])
        while hi < len(paragraphs) and used + len(paragraphs[hi]["context"]) <= PRETRAIN_CHARS:
            used += len(paragraphs[hi]["context"])
            hi += 1
        return "\n\n".join(p["context"] for p in paragraphs[at:hi])

    write(
        "pretrain-windows.jsonl",
        ({"text": following(articles[t], i)} for t in train for i in range(len(articles[t]))),
    )
    paragraphs = write(
        "paragraphs.jsonl",
        ({"text": p["context"]} for t in train for p in articles[t]),
    )
    questions = write(
        "qa-train.jsonl",
        (
            {"context": p["context"], "question": q["question"], "answer": q["answers"][0]}
            for t in train
            for p in articles[t]
            for q in p["qas"]
        ),
    )
    held_questions = write(
        "qa-held.jsonl",
        (
            {"context": p["context"], "question": q["question"], "answer": q["answers"]}
            for t in held
            for p in articles[t]
            for q in p["qas"]
        ),
    )
    rng = random.Random(0)
    for name, titles, answers in [("qa-train-doc.jsonl", train, False), ("qa-held-doc.jsonl", held, True)]:
        write(
            name,
            (
                {
                    "context": window(articles[t], i, rng),
                    "question": q["question"],
                    "answer": q["answers"] if answers else q["answers"][0],
                }
                for t in titles
                for i, p in enumerate(articles[t])
                for q in p["qas"]
            ),
        )
    print(
        f"{out}: {texts} training articles, {paragraphs} paragraphs, {questions} questions; "
        f"held apart: {', '.join(held)} ({held_questions} questions)"
    )


if __name__ == "__main__":
    main()
