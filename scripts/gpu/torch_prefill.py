"""The reference beside `sac compress` on a GPU: one causal prefill of a document
by Hugging Face transformers (bf16, SDPA attention, which takes PyTorch's
flash kernel on an H200), the K/V cache kept as a prompt cache is. Prints the
median of 5 timed runs after 2 warm-ups, in tokens/s and in TFLOP/s of the
model's matrix products (2 x parameters per token for the linear layers, 4 x
head_dim x heads x visible keys per token for the attention), beside a bf16
8192^3 matrix product on the same GPU, the roofline.

    python3 scripts/gpu/torch_prefill.py MODEL_DIR DOCUMENT.txt
"""
import json
import statistics
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def timed(fn, warm=2, runs=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


model_dir, document = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{model_dir}/config.json"))
ids = Tokenizer.from_file(f"{model_dir}/tokenizer.json").encode(open(document).read()).ids
n = len(ids)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
x = torch.tensor([ids], device="cuda")


@torch.inference_mode()
def prefill():
    model(x, use_cache=True, logits_to_keep=1)


seconds = timed(prefill)
h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
head_dim = cfg.get("head_dim", h // heads)
linear = sum(p.numel() for name, p in model.named_parameters() if "layers." in name and p.dim() == 2)
flops = 2 * linear * n + layers * 4 * head_dim * heads * n * (n + 1) / 2
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
matmul = timed(lambda: a @ a, warm=3, runs=10)
roof = 2 * 8192**3 / matmul
print(f"torch prefill, {n} tokens: {n / seconds:.0f} tokens/s, {seconds * 1e3:.1f} ms, "
      f"{flops / seconds / 1e12:.0f} TFLOP/s; bf16 8192^3 matmul {roof / 1e12:.0f} TFLOP/s "
      f"(the roofline: {roof / (flops / n):.0f} tokens/s)")
