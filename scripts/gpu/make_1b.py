"""Writes a random-weight model of Llama-3.2-1B's shape (bf16, on the GPU) with
the llama3 fixture's tokenizer, for scripts/gpu/bench.sh.

    python3 scripts/gpu/make_1b.py OUT_DIR
"""
import json, os, shutil, sys
import torch
from safetensors.torch import save_file
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
fx = "tests/fixtures/parity/llama3"
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(os.path.join(fx, f), out)
base = json.load(open(os.path.join(fx, "config.json")))
cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
           intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
           head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
           rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
           tie_word_embeddings=True, bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"])
json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
g = torch.Generator(device="cuda").manual_seed(0)
h, m, L = 2048, 8192, 16
t = {"model.embed_tokens.weight": (128256, h), "model.norm.weight": (h,)}
for i in range(L):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (2048, h), p + "self_attn.k_proj.weight": (512, h),
              p + "self_attn.v_proj.weight": (512, h), p + "self_attn.o_proj.weight": (h, 2048),
              p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m)})
w = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g, device="cuda") * 0.02).to(torch.bfloat16).cpu()
     for k, s in t.items()}
save_file(w, os.path.join(out, "model.safetensors"))
print("wrote", out)
