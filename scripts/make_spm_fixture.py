#!/usr/bin/env python3
"""A tiny SentencePiece ("llama"-style) GGUF vocabulary and its reference ids.

Trains a 400-piece SentencePiece BPE model with byte fallback, and as
Llama's tokenizer.model no normalization and spaces kept, on the SQuAD
paragraphs of tests/fixtures/squad (CC BY-SA 4.0), writes its vocabulary as
llama.cpp's converter does (tokenizer.ggml.model "llama": pieces, scores,
token types, BOS/EOS/UNK ids, add_space_prefix) into a GGUF holding no
tensors, and records what SentencePiece itself makes of a few texts.

Run from the repository root:

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt
    .venv/bin/python scripts/make_spm_fixture.py

Writes tests/fixtures/spm/{vocab.gguf,reference.json}.
"""

import io
import json
import os

import gguf
import sentencepiece as spm

OUT = "tests/fixtures/spm"
CORPUS = [
    "tests/fixtures/squad/black_death.txt",
]
TEXTS = [
    "The Black Death killed 75 to 200 million people in 1346-1353.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "naïve café, Zürich — ½ ✓ 🐀 漢字",
    "hello",
    "",
]


def main():
    text = "\n".join(open(p, encoding="utf-8").read() for p in CORPUS)
    text += "\n" + json.load(open("tests/fixtures/squad/oil_crisis.json"))["context"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split(". ")),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        # As Llama's tokenizer.model: no normalization, spaces kept.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        seed_sentencepiece_size=10000,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    os.makedirs(OUT, exist_ok=True)
    writer = gguf.GGUFWriter(os.path.join(OUT, "vocab.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reference = [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in TEXTS]
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"pieces": sp.get_piece_size(), "bos": sp.bos_id(), "eos": sp.eos_id(), "texts": reference},
            f,
            ensure_ascii=False,
            indent=1,
        )
    print(f"{OUT}: {sp.get_piece_size()} pieces")


if __name__ == "__main__":
    main()
