"""How often a quality-bench run's answers end in the right value.

With `--answer-form fact` the model answers with a whole fact (" Kalomi
lives in paris"), and the bench's EM needs every word of it, the name
copied from the question included. This asks the test questions again on
the .sack files a bench run left under OUT/eval, and counts the answers
whose last word is the expected value (the values are single words).

    python3 scripts/value_accuracy.py target/quality full-1 sac-4 uniform-8

Needs the `sac` binary (SAC, default target/release/sac); no Python packages.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys


def last_word(text):
    words = re.findall(r"[a-z]+", text.lower())
    return words[-1] if words else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the bench's --out directory")
    ap.add_argument("settings", nargs="+", help="directories under OUT/eval, e.g. full-1 sac-4")
    args = ap.parse_args()
    sac = os.environ.get("SAC", "target/release/sac")
    with open(os.path.join(args.out, "test.jsonl")) as f:
        test = [json.loads(line) for line in f]
    docs = [list(g) for _, g in itertools.groupby(test, key=lambda e: e["context"])]
    for setting in args.settings:
        work = os.path.join(args.out, "eval", setting)
        right = exact = asked = 0
        for i, doc in enumerate(docs):
            out = subprocess.run(
                [sac, "ask", os.path.join(work, f"doc{i}.sack"), "--batch",
                 os.path.join(work, f"doc{i}.jsonl"), "--max-tokens", "24"],
                capture_output=True, text=True, check=True).stdout
            for line, example in zip(out.splitlines(), doc):
                answer = json.loads(line)["answer"]
                right += last_word(answer) == last_word(example["answer"])
                exact += answer.strip() == example["answer"].strip()
                asked += 1
        print(f"{setting}: value right {100 * right / asked:.1f} %, "
              f"whole answer right {100 * exact / asked:.1f} % ({asked} questions)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
