#!/usr/bin/env python3
"""GMSA reference fixtures, computed with HF transformers + PEFT as the official code
(github.com/Twilightaaa/GMSA, modeling_gmsa.py) computes them.

Run from the repository root, after scripts/make_fixtures.py's requirements and `peft`:

    .venv/bin/python scripts/make_gmsa_fixtures.py

Writes tests/fixtures/gmsa/{llama3,qwen2}/:
  model/                 a 4-layer random base model (HF directory, f32)
  adapter/               a GMSA adapter in sac's format (adapter_config.json,
                         adapter.safetensors): encoder LoRA on every linear layer of the
                         first ENCODER_LAYERS layers, and the LSA layer's own weights
  adapter_stage2/        the same adapter after a stage 2: with a decoder LoRA on every
                         linear layer of every layer (PEFT, random), `decoder_lora` in
                         its config
  reference.safetensors  context and question ids, the encoder's last hidden states,
                         the pooled vectors, the soft tokens, the decoder's logits,
                         the loss of one autoencoding step (stage 1), and with the
                         decoder LoRA the logits for the question and the loss of one
                         qa step (stage 2: the answer and EOS scored)

What the official code does, and this script with it:
  encoder  the base model truncated to ENCODER_LAYERS layers (embeddings, layers,
           final norm) wrapped by PEFT LoRA with target_modules="all-linear"; reads the
           context ids alone (no BOS), causal, positions 0..n-1; hidden_states[-1] is
           after the final norm.
  merging  mean of each run of MERGE_SIZE hidden states; a remainder is pooled into one
           more vector.
  LSA      a copy of the base model truncated to LSA_LAYERS layers (layer 0 and the
           final norm), its layers trained; reads the pooled vectors as input embeddings
           at positions 0..m-1, causal; hidden_states[-1] (after the norm) are the soft
           tokens.
  decoder  the base model reads the soft tokens, then the prompt's token embeddings,
           positions 0.. without a gap.
  stage 1  the prompt is "Restate the aforementioned Text.", the target the context and
           EOS; HF's shifted cross-entropy over the target tokens only.
Here the LoRA matrices and the LSA layer are random (B is not zero), standing in for
trained ones. Seeded and single-threaded: a re-run reproduces the same bytes.
"""

import copy
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "gmsa")

LAYERS = 4
ENCODER_LAYERS = 2
LSA_LAYERS = 1
MERGE_SIZE = 4
LORA_RANK = 4
LORA_ALPHA = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTEXT = "The cat sat on the warm stone wall and watched the birds in the garden."
QUESTION = "\n### Question: Where did the cat sit?\n### Answer:"
RESTATE = "Restate the aforementioned Text."
ANSWER = " on the wall"


def load(model_dir: str, layers: int):
    cfg = AutoModelForCausalLM.from_pretrained(model_dir).config
    cfg = copy.deepcopy(cfg)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def group_merge(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """modeling_gmsa.py's pooling for one sample: [n, h] -> [ceil(n / k), h]."""
    n, h = hidden.shape
    full = n - n % k
    parts = [hidden[:full].reshape(-1, k, h).mean(1)]
    if n % k:
        parts.append(hidden[full:].mean(0, keepdim=True))
    return torch.cat(parts, 0)


def lora_config() -> LoraConfig:
    """The official code's LoRA: every linear layer (PEFT's all-linear)."""
    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def lora_tensors(peft_model, prefix: str) -> dict:
    """A PEFT model's LoRA as sac names it: `{prefix}.layers.{i}.{block}.{proj}.lora_{a|b}`,
    transposed to [in, rank] and [rank, out]."""
    tensors = {}
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            continue
        # base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.default.weight
        parts = n.split(".")
        layer, block, proj, which = parts[4], parts[5], parts[6], parts[7]
        ours = "lora_a" if which == "lora_A" else "lora_b"
        tensors[f"{prefix}.layers.{layer}.{block}.{proj}.{ours}"] = p.detach().t().contiguous()
    return tensors


def make(name: str, tok, bos_id: int, eos_id: int) -> None:
    out = os.path.join(OUT, name)
    model_dir = os.path.join(out, "model")
    adapter_dir = os.path.join(out, "adapter")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(adapter_dir)

    mf.N_LAYERS = LAYERS
    cfg = mf.make_configs(tok.get_vocab_size(), bos_id, eos_id)[name]
    base = mf.build_model(f"gmsa-{name}", cfg)
    base.save_pretrained(model_dir, safe_serialization=True)
    mf.legacy_rope_keys(os.path.join(model_dir, "config.json"))
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(mf.tokenizer_config(bos_id, eos_id), f, indent=2, sort_keys=True)
        f.write("\n")

    g = torch.Generator().manual_seed(sum(map(ord, name)) * 104729)

    encoder = load(model_dir, ENCODER_LAYERS)
    encoder = get_peft_model(encoder, lora_config())
    with torch.no_grad():
        for n, p in encoder.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lsa = load(model_dir, LSA_LAYERS)
    with torch.no_grad():
        for p in lsa.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))

    context = tok.encode(CONTEXT, add_special_tokens=False).ids
    question = tok.encode(QUESTION, add_special_tokens=False).ids
    assert len(context) % MERGE_SIZE, "the context should leave a remainder group"
    with torch.no_grad():
        ids = torch.tensor([context])
        hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        after_norm = encoder.base_model.model.model(input_ids=ids).last_hidden_state[0]
        assert torch.equal(hidden, after_norm), "hidden_states[-1] is not after the norm"
        pooled = group_merge(hidden, MERGE_SIZE)
        soft = lsa(inputs_embeds=pooled[None], output_hidden_states=True).hidden_states[-1][0]
        prompt = base.model.embed_tokens(torch.tensor([question]))[0]
        logits = base(inputs_embeds=torch.cat([soft, prompt])[None]).logits[0]
        restate = tok.encode(RESTATE, add_special_tokens=False).ids
        target = context + [eos_id]
        read = base.model.embed_tokens(torch.tensor([restate + target]))[0]
        labels = [-100] * (soft.shape[0] + len(restate)) + target
        autoencode_loss = base(
            inputs_embeds=torch.cat([soft, read])[None], labels=torch.tensor([labels])
        ).loss

    # Stage 2: the decoder with its own LoRA (drawn after everything above, so
    # the stage-1 fixtures stay as they were), reading the soft tokens too.
    decoder = get_peft_model(copy.deepcopy(base), lora_config())
    decoder.eval()
    with torch.no_grad():
        for n, p in decoder.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        answer = tok.encode(ANSWER, add_special_tokens=False).ids + [eos_id]
        qa_logits = decoder(inputs_embeds=torch.cat([soft, prompt])[None]).logits[0]
        read = base.model.embed_tokens(torch.tensor([question + answer]))[0]
        labels = [-100] * (soft.shape[0] + len(question)) + answer
        qa_loss = decoder(
            inputs_embeds=torch.cat([soft, read])[None], labels=torch.tensor([labels])
        ).loss

    tensors = lora_tensors(encoder, "encoder")
    for n, p in lsa.model.layers.named_parameters():
        tensors[f"lsa.layers.{n}"] = p.detach().contiguous()
    save_file(tensors, os.path.join(adapter_dir, "adapter.safetensors"))
    config = {
        "method": "gmsa",
        "base_model": "../model",
        "encoder_layers": ENCODER_LAYERS,
        "merge_size": MERGE_SIZE,
        "lsa_layers": LSA_LAYERS,
        "lora_rank": LORA_RANK,
        "lora_scale": LORA_ALPHA / LORA_RANK,
        "lora_targets": TARGETS,
    }
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    stage2_dir = os.path.join(out, "adapter_stage2")
    os.makedirs(stage2_dir)
    save_file(
        {**tensors, **lora_tensors(decoder, "decoder")},
        os.path.join(stage2_dir, "adapter.safetensors"),
    )
    config["decoder_lora"] = {
        "rank": LORA_RANK,
        "scale": LORA_ALPHA / LORA_RANK,
        "targets": TARGETS,
    }
    with open(os.path.join(stage2_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    save_file(
        {
            "context_ids": torch.tensor(context, dtype=torch.int64),
            "question_ids": torch.tensor(question, dtype=torch.int64),
            "encoder_hidden": hidden.contiguous(),
            "pooled": pooled.contiguous(),
            "soft_tokens": soft.contiguous(),
            "logits": logits.contiguous(),
            "restate_ids": torch.tensor(restate, dtype=torch.int64),
            "target_ids": torch.tensor(target, dtype=torch.int64),
            "autoencode_loss": autoencode_loss.reshape(1),
            "answer_ids": torch.tensor(answer, dtype=torch.int64),
            "qa_logits": qa_logits.contiguous(),
            "qa_loss": qa_loss.reshape(1),
        },
        os.path.join(out, "reference.safetensors"),
    )
    mf.log(f"{name}: {len(context)} context tokens -> {soft.shape[0]} soft tokens, "
           f"{len(tensors)} adapter tensors")


def main() -> None:
    torch.set_num_threads(1)
    tok = mf.build_tokenizer()
    bos_id, eos_id = tok.token_to_id(mf.BOS), tok.token_to_id(mf.EOS)
    for name in ["llama3", "qwen2"]:
        make(name, tok, bos_id, eos_id)


if __name__ == "__main__":
    main()
