"""The quality bench's smallest case, trained in PyTorch with HF transformers'
Llama: is the bench's plateau (a coin toss between two people) ours or the
task's?

Each example is a two-person document ("Kifador visits dublin. Kalomi visits
paris.", names made like benches/quality/data.rs's training names), one
question about one of them in sac's prompt layout, and the whole fact as the
answer; the loss is the answer's tokens plus --doc-weight of the document's
next-token loss, as in benches/quality/base.rs. It prints the greedy accuracy
on the value's token every 100 steps (--easy documents, whose facts are a
name and a value alone, are not counted).

    python3 scripts/reference_drill.py target/quality/model --steps 3000
    python3 scripts/reference_drill.py target/quality/model --fact "{n} {v}." --repeat
    python3 scripts/reference_drill.py target/quality/model --repeat --easy 0.5

MODEL_DIR gives the config and tokenizer (a bench run's `model`); the weights
start random. Needs torch, transformers, tokenizers (pip; CPU is enough).
"""

import argparse
import json
import math
import random

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

SYLLABLES = ("ka lo mi ren tu sa vo ni bel dor fa gi ha jo ki lu mar nor pe qui ros ti "
             "wen zo").split()
CITIES = "paris london cairo lima oslo tokyo dublin madrid quito delhi perth rome".split()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--fact", default="{n} visits {v}.", help="a fact, {n} name, {v} value")
    ap.add_argument("--repeat", action="store_true",
                    help="the document's facts again, shuffled, after them")
    ap.add_argument("--easy", type=float, default=0.0,
                    help="share of documents whose facts are just '{n} {v}.'")
    ap.add_argument("--easy-steps", type=int, default=0,
                    help="steps at the start whose documents are all --easy ones")
    ap.add_argument("--doc-weight", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    with open(f"{args.model_dir}/config.json") as f:
        config = LlamaConfig.from_dict(json.load(f))
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # N(0, 1/fan_in), norms at one: the bench's init
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, p.shape[-1] ** -0.5)

    names = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]
    names += [a + b for a in SYLLABLES for b in SYLLABLES]
    names = [n.capitalize() for i, n in enumerate(names) if i % 5]
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    def example(step):
        people = rng.sample(names, 2)
        values = [rng.choice(CITIES) for _ in people]
        easy = args.easy > 0 and rng.random() < args.easy  # keeps other runs' stream
        easy = easy or step <= args.easy_steps
        form = "{n} {v}." if easy else args.fact
        facts = [form.format(n=n, v=v) for n, v in zip(people, values)]
        if args.repeat:
            facts += rng.sample(facts, len(facts))
        k = rng.randrange(2)
        doc = [bos] + enc("### Context:\n" + " ".join(facts))
        question = enc(f"\n### Question:\nWhich city does {people[k]} visit?\n### Answer:\n")
        before = enc(" " + form.format(n=people[k], v="\0").split(" \0")[0])
        answer = before + enc(f" {values[k]}") + [eos]
        weights = ([args.doc_weight / (len(doc) - 1)] * (len(doc) - 1) + [0.0] * len(question)
                   + [1.0 / len(answer)] * len(answer))
        return doc + question + answer, weights, len(doc) + len(question) + len(before) - 1, easy

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    right, asked = [0, 0], [0, 0]  # hard documents, easy ones
    for step in range(1, args.steps + 1):
        progress = step / args.steps  # 5 % warmup, then cosine to zero
        lr = args.lr * (max(progress / 0.05, 0.01) if progress < 0.05
                        else 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [example(step) for _ in range(args.batch)]
        n = max(len(ids) for ids, _, _, _ in batch)
        ids = torch.tensor([ids + [0] * (n - len(ids)) for ids, _, _, _ in batch])
        weights = torch.tensor([w + [0.0] * (n - 1 - len(w)) for _, w, _, _ in batch])
        logits = model(input_ids=ids).logits[:, :-1]
        picked = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(picked * weights).sum() / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for row, (_, _, at, easy) in enumerate(batch):
            right[easy] += int(logits[row, at].argmax() == ids[row, at + 1])
            asked[easy] += 1
        if step % 100 == 0:
            hard, short = (f"{100 * r / a:.1f} %" if a else "-" for r, a in zip(right, asked))
            print(f"step {step} loss {loss.item():.3f} answers {hard} (short facts {short})",
                  flush=True)
            right, asked = [0, 0], [0, 0]


if __name__ == "__main__":
    main()
