#!/usr/bin/env python3
"""sac beside llama.cpp and HF transformers on SmolLM2-135M-Instruct (or the 1B shape), in one run.

What a user compares: making a .sack of a document (`sac compress`, each compressor)
against re-prefilling the document in llama.cpp (`llama-bench -p N -n 0`) or transformers
(one forward pass, logits of the last position only); decoding from a .sack (`sac ask`)
against llama.cpp's token generation after a prompt of the same length; and `sac ask`'s
whole-process time to its first token from a ratio-4 .sack of the longest document.

Run from the repository root on an idle machine, after `cargo build --release`,
`scripts/fetch_smollm2.sh` and `scripts/build_llamacpp.sh`:

    .venv/bin/python scripts/bench_llamacpp.py --sizes 512,2048,4096,7500 --repeats 3

The GGUF (Q4_1) is dequantized once by llama-quantize to F32 and BF16 files (cached in
target/llamacpp): sac's `--dtype f32` runs beside the F32 file, its `--dtype bf16` (bf16
weights under f32 activations on a CPU with AVX512-BF16, as llama.cpp runs a BF16 file)
beside the BF16 file. `--shape 1b` runs a model of Llama-3.2-1B's
layer shapes (16 layers, hidden 2048, 32 query and 8 KV heads, MLP 8192) with random
weights and SmolLM2's tokenizer and vocabulary, written once as an F32 GGUF with
llama.cpp's gguf-py (numpy only; cached in target/llamacpp); sac and llama.cpp read that
file, llama.cpp's bf16 column its llama-quantize'd BF16 copy. Documents are SQuAD v1.1 dev paragraphs
(CC BY-SA 4.0), cut to the size. Runs of all tools are alternated, round after round;
the table holds medians, and the ratio is sac's rate over the peer's (above 1: sac is
faster). Threads: all cores for every tool. Prints a markdown table.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "target/models/SmolLM2-135M-Instruct.Q4_1.gguf")
ONE_B = os.path.join(ROOT, "target/llamacpp/llama-1b-shape.F32.gguf")
SAC = os.path.join(ROOT, "target/release/sac")
ITEMS = os.path.join(ROOT, "benches/quality/items/dev.jsonl")
MODEL = GGUF  # what sac (and transformers) read: the GGUF, or the 1B shape's
COMPRESSORS = ["full", "uniform", "snapkv", "kvzip"]


def run(cmd, **kw):
    """Runs `cmd` under /usr/bin/time; returns (stdout, stderr, seconds, peak RSS MiB)."""
    started = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, **kw)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    lines = out.stderr.rstrip("\n").split("\n")
    return out.stdout, "\n".join(lines[:-1]), seconds, int(lines[-1]) / 1024


def llamacpp_bin() -> str:
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/build_llamacpp.sh")],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def quantized(bin_dir: str, source: str, path: str, kind: str) -> str:
    """`source` converted by llama-quantize to `kind` at `path`, once."""
    if not os.path.exists(path):
        subprocess.run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize",
                        source, path + ".part", kind], check=True, capture_output=True)
        os.replace(path + ".part", path)
    return path


def one_b_shape(bin_dir: str) -> str:
    """The 1B-shaped F32 GGUF (see the module's help), written once."""
    if os.path.exists(ONE_B):
        return ONE_B
    build = os.path.dirname(bin_dir)  # target/llamacpp/build-VERSION
    version = os.path.basename(build).removeprefix("build-")
    sys.path.insert(0, os.path.join(os.path.dirname(build), f"llama_cpp_python-{version}",
                                    "vendor", "llama.cpp", "gguf-py"))
    import gguf
    import numpy as np
    source = gguf.GGUFReader(GGUF)
    shape = {"llama.block_count": 16, "llama.embedding_length": 2048, "llama.feed_forward_length": 8192,
             "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
             "llama.rope.dimension_count": 64, "general.file_type": 0}
    out = gguf.GGUFWriter(ONE_B + ".part", "llama")
    for name, field in source.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.quantization_version"):
            continue
        value = shape.get(name, field.contents())
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        out.add_key_value(name, value, field.types[0], sub)
    rng = np.random.default_rng(0)
    vocab, h, kv, ff = source.fields["llama.vocab_size"].contents(), 2048, 512, 8192
    tensors = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    for i in range(16):
        tensors.update({f"blk.{i}.{n}": s for n, s in [
            ("attn_norm.weight", (h,)), ("ffn_norm.weight", (h,)), ("attn_q.weight", (h, h)),
            ("attn_k.weight", (kv, h)), ("attn_v.weight", (kv, h)), ("attn_output.weight", (h, h)),
            ("ffn_gate.weight", (ff, h)), ("ffn_up.weight", (ff, h)), ("ffn_down.weight", (h, ff))]})
    for name, dims in tensors.items():
        values = np.ones(dims, np.float32) if len(dims) == 1 else \
            rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
        out.add_tensor(name, values)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    os.replace(ONE_B + ".part", ONE_B)
    return ONE_B


def document(words: int) -> str:
    """The first `words` words of the dev split's paragraphs, in order."""
    text = []
    with open(ITEMS) as f:
        for line in f:
            text.extend(json.loads(line)["text"].split())
            if len(text) >= words:
                break
    return " ".join(text[:words])


def sized_document(tokens: int, workdir: str) -> str:
    """A document file whose raw-layout context has about `tokens` SmolLM2 tokens."""
    path = os.path.join(workdir, f"doc{tokens}.txt")
    # From below: a first guess too long for the model's 8,192 positions is refused. The
    # longest size that fits is about 7,500: kvzip reads up to 539 tokens after the document.
    words = int(tokens * 0.6)
    for _ in range(6):
        with open(path, "w") as f:
            f.write(document(words))
        _, err, _, _ = run([SAC, "compress", path, "-m", MODEL, "--compressor", "uniform",
                            "--ratio", "64", "-o", os.path.join(workdir, "probe.sack")])
        got = int(re.search(r": (\d+) tokens,", err).group(1))
        if abs(got - tokens) <= tokens // 100:
            return path
        words = int(words * tokens / got)
    return path


def sac_compress(doc: str, compressor: str, dtype: str, out: str):
    flags = [] if compressor == "full" else ["--ratio", "4"]
    _, err, _, rss = run([SAC, "compress", doc, "-m", MODEL, "--compressor", compressor,
                          "--dtype", dtype, "-o", out] + flags)
    return float(re.search(r", (\d+) tokens/s", err).group(1)), rss


def llama_bench(bin_dir: str, model: str, threads: int, args):
    out, _, _, rss = run([os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads),
                          "-r", "1", "-o", "json"] + args)
    return json.loads(out)[0]["avg_ts"], rss


def hf_prefill(tokens: int, threads: int):
    """transformers: one forward pass over `tokens` tokens (last logits only), seconds."""
    code = f"""
import time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
m = AutoModelForCausalLM.from_pretrained({os.path.dirname(MODEL)!r}, gguf_file={os.path.basename(MODEL)!r},
                                         dtype=torch.float32)
ids = torch.randint(100, 40000, (1, {tokens}), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    m(ids[:, :16], logits_to_keep=1)
    t = time.perf_counter(); m(ids, logits_to_keep=1); print(time.perf_counter() - t)
"""
    out, _, _, rss = run([os.path.join(ROOT, ".venv/bin/python"), "-c", code])
    return tokens / float(out.strip().splitlines()[-1]), rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,2048,4096,7500")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compressors", default=",".join(COMPRESSORS))
    ap.add_argument("--dtypes", default="f32,bf16",
                    help="sac's --dtype values, each beside llama.cpp's file of that dtype")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--shape", choices=["smollm2", "1b"], default="smollm2")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    compressors = a.compressors.split(",")
    dtypes = a.dtypes.split(",")
    bin_dir = llamacpp_bin()
    global MODEL
    if a.shape == "1b":
        MODEL = f32 = one_b_shape(bin_dir)
        bf16 = quantized(bin_dir, f32, ONE_B.replace(".F32.", ".BF16."), "BF16")
    else:
        f32, bf16 = (quantized(bin_dir, GGUF, os.path.join(ROOT, f"target/llamacpp/SmolLM2-135M-Instruct.{kind}.gguf"),
                               kind) for kind in ("F32", "BF16"))
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    peers = {"f32": f32, "bf16": bf16}
    rates, rss = {}, {}

    def note(key, value):
        rates.setdefault(key, []).append(value[0])
        rss[key] = max(rss.get(key, 0), value[1])

    with tempfile.TemporaryDirectory() as work:
        docs = {n: sized_document(n, work) for n in sizes}
        full_sack = os.path.join(work, "full1024.sack")
        run([SAC, "compress", sized_document(1024, work), "-m", MODEL, "--compressor", "full",
             "--dtype", "f32", "-o", full_sack])
        longest = os.path.join(work, "longest-r4.sack")
        run([SAC, "compress", docs[max(sizes)], "-m", MODEL, "--compressor", "uniform",
             "--ratio", "4", "-o", longest])
        for round_ in range(a.repeats):
            print(f"round {round_ + 1} of {a.repeats}", file=sys.stderr)
            for n in sizes:
                for d in dtypes:
                    for c in compressors:
                        note(("sac", d, c, n), sac_compress(docs[n], c, d, os.path.join(work, "x.sack")))
                    note(("llama.cpp", d, "prefill", n),
                         llama_bench(bin_dir, peers[d], a.threads, ["-p", str(n), "-n", "0"]))
                if not a.no_transformers:
                    note(("transformers", "f32", "prefill", n), hf_prefill(n, a.threads))
            for d in dtypes:
                out, _, _, mem = run([SAC, "ask", full_sack, "Summarise the text.", "--json",
                                      "--max-tokens", "128", "--dtype", d])
                note(("sac", d, "decode", 1024), (json.loads(out)["tokens_per_s"], mem))
                note(("llama.cpp", d, "decode", 1024),
                     llama_bench(bin_dir, peers[d], a.threads, ["-p", "0", "-n", "128", "-d", "1024"]))
                _, _, seconds, mem = run([SAC, "ask", longest, "Who is it about?", "--max-tokens", "1",
                                          "--dtype", d])
                note(("sac", d, "first token", max(sizes)), (1.0 / seconds, mem))

    med = {k: statistics.median(v) for k, v in rates.items()}
    print("| work | tokens | sac dtype | sac | llama.cpp, same dtype | sac / llama.cpp | transformers f32 "
          "| peak RSS MiB (sac) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        hf = med.get(("transformers", "f32", "prefill", n))
        for c in compressors:
            for d in dtypes:
                ours, peer = med[("sac", d, c, n)], med[("llama.cpp", d, "prefill", n)]
                print(f"| compress {c} | {n} | {d} | {ours:.0f} tok/s | {peer:.0f} | {ours / peer:.2f}x | "
                      f"{f'{hf:.0f}' if hf else '-'} | {rss[('sac', d, c, n)]:.0f} |")
    for d in dtypes:
        ours, peer = med[("sac", d, "decode", 1024)], med[("llama.cpp", d, "decode", 1024)]
        print(f"| decode 128 after 1,024 | 1024 | {d} | {ours:.0f} tok/s | {peer:.0f} | {ours / peer:.2f}x | - | "
              f"{rss[('sac', d, 'decode', 1024)]:.0f} |")
    for d in dtypes:
        key = ("sac", d, "first token", max(sizes))
        print(f"| `sac ask` to first token, ratio-4 .sack, whole process | {max(sizes)} | {d} | "
              f"{1.0 / med[key]:.2f} s | - | - | - | {rss[key]:.0f} |")
    print(f"\n{a.repeats} alternated rounds, medians; {a.threads} threads; "
          f"llama.cpp {os.path.basename(os.path.dirname(bin_dir))}.")

if __name__ == "__main__":
    main()
