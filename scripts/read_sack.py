#!/usr/bin/env python3
"""Reference reader for .sack files, written from man/sack.5 alone.

    read_sack.py FILE              print the header and the tensor list after
                                   checking every checksum and decoding every tensor
    read_sack.py FILE --dump DIR   also write each decoded tensor to DIR/<name>.bin
                                   (little-endian float32, or uint32 for positions)

As a module: read_sack(path) returns (header, {name: numpy array}).
Needs numpy and zstandard (pip install numpy zstandard).
"""

import argparse
import json
import math
import os
import re
import struct
import sys
import zlib

import numpy as np
import zstandard

MAGIC = b"\x89SAC\r\n\x1a\n"
FOOTER_MAGIC = b"SACK-END"
SUPPORTED_MAJOR = 1
PREAMBLE_LEN = 16
FOOTER_LEN = 32
MIN_FILE_LEN = PREAMBLE_LEN + 4 + FOOTER_LEN
MAX_HEADER_LEN = 1 << 20
MAX_DIRECTORY_LEN = 1 << 28
MAX_WINDOW = 1 << 23
MAX_EXPANSION = 1024
EXPANSION_SLACK = 1 << 16

NAME = re.compile(r"^(pos|key|value|soft)(?:\.l(0|[1-9][0-9]*)(?:\.h(0|[1-9][0-9]*))?)?\.s(0|[1-9][0-9]*)$")
WIDTH = {"f32": 4, "bf16": 2, "f16": 2, "u32": 4}
DTYPE_OF = {"f32": "f32", "bf16": "bf16", "f16": "f16", "u32": "u32",
            "q8-channel": "f32", "q8-token": "f32", "q4-channel": "f32", "q4-token": "f32"}


class SackError(Exception):
    """The file is not a valid .sack; the message says which check failed."""


def read_sack(path):
    """Reads, checks and decodes a whole file: (header dict, {name: array})."""
    with open(path, "rb") as f:
        data = f.read()
    header, entries = parse(data)
    return header, {e["name"]: decode_tensor(data, e, header) for e in entries}


def parse(data):
    """Checks the framing, header and directory (READING, steps 1-6)."""
    n = len(data)
    if n < MIN_FILE_LEN or data[:8] != MAGIC:
        if data[:8] == MAGIC[: min(n, 8)] and n > 0:
            raise SackError(f"file is truncated: {n} bytes")
        raise SackError("not a .sack file")
    major, minor, header_len = struct.unpack_from("<HHI", data, 8)
    if major != SUPPORTED_MAJOR:
        raise SackError(f"format version {major}.{minor} is not supported; "
                        f"this reader reads {SUPPORTED_MAJOR}.x")
    if header_len > MAX_HEADER_LEN or MIN_FILE_LEN + header_len > n:
        raise SackError("header length out of range")
    header_end = PREAMBLE_LEN + header_len
    (header_crc,) = struct.unpack_from("<I", data, header_end)
    if zlib.crc32(data[:header_end]) != header_crc:
        raise SackError("checksum mismatch in header")
    header = json.loads(data[PREAMBLE_LEN:header_end].decode("utf-8"))
    data_start = header_end + 4

    footer = data[n - FOOTER_LEN:]
    if footer[24:] != FOOTER_MAGIC:
        raise SackError("no footer at the end of the file (truncated or bytes appended)")
    dir_offset, dir_len, dir_crc, footer_crc = struct.unpack_from("<QQII", footer)
    if zlib.crc32(footer[:20]) != footer_crc:
        raise SackError("checksum mismatch in footer")
    if dir_len > MAX_DIRECTORY_LEN or dir_offset < data_start or dir_offset + dir_len != n - FOOTER_LEN:
        raise SackError("directory bounds out of range")
    directory = data[dir_offset:dir_offset + dir_len]
    if zlib.crc32(directory) != dir_crc:
        raise SackError("checksum mismatch in directory")
    entries = json.loads(directory.decode("utf-8"))["tensors"]
    check_directory(header, entries, data_start, dir_offset)
    return header, entries


def check_directory(header, entries, data_start, data_end):
    """The rules of DIRECTORY, TENSOR NAMES, SEGMENTS AND KEPT SETS and SHAPES."""
    check_tiling(entries, data_start, data_end)
    names = {e["name"] for e in entries}
    if len(names) != len(entries):
        raise SackError("a tensor name is listed twice")
    if "soft_tokens" in header:
        check_soft(header, entries)
    else:
        check_kv(header, entries)


def check_soft(header, entries):
    """A file of soft tokens: one soft.sS tensor [n, hidden] per segment, nothing else."""
    hidden = header["soft_tokens"]["hidden"]
    if not 1 <= hidden <= 65536:
        raise SackError("soft_tokens.hidden is outside 1..=65536")
    if header.get("decoder", {}).get("prefix_embeddings"):
        raise SackError("decoder.prefix_embeddings come with K/V, not soft tokens")
    adapter = header.get("decoder", {}).get("adapter")
    if adapter is not None:
        fingerprint, name = adapter.get("fingerprint"), adapter.get("id")
        if not isinstance(fingerprint, str) or not isinstance(name, str) \
                or not 1 <= len(fingerprint.encode()) <= 4096 or len(name.encode()) > 4096:
            raise SackError("decoder.adapter needs an id and a fingerprint of at most 4096 bytes")
    segments, rows = set(), 0
    for e in entries:
        m = NAME.match(e["name"])
        if not m or m.group(1) != "soft" or m.group(2) is not None:
            raise SackError(f"{e['name']!r} in a file of soft tokens")
        shape = e["shape"]
        if len(shape) != 2 or shape[1] != hidden or e["encoding"] in ("u32", "q8-channel", "q4-channel"):
            raise SackError(f"{e['name']}: bad shape or encoding")
        if e["dtype"] != DTYPE_OF[e["encoding"]]:
            raise SackError(f"{e['name']}: dtype does not match encoding")
        segments.add(int(m.group(4)))
        rows += shape[0]
    if segments != set(range(len(segments))):
        raise SackError("directory is incomplete")
    if rows > header["document"]["tokens"]:
        raise SackError("more soft tokens than the document has tokens")


def check_kv(header, entries):
    """A file of K/V: positions, keys and values for every set, slot and segment."""
    if header.get("decoder", {}).get("adapter") is not None:
        raise SackError("decoder.adapter comes with soft tokens, not K/V")
    model, layout = header["model"], header["kv"]["layout"]
    layers, heads, head_dim = model["layers"], model["kv_heads"], model["head_dim"]
    tokens = header["document"]["tokens"]
    kept = {}
    for e in entries:
        m = NAME.match(e["name"])
        if not m or m.group(1) == "soft":
            raise SackError(f"invalid tensor name {e['name']!r}")
        kind, layer, head, segment = m.group(1), m.group(2), m.group(3), int(m.group(4))
        layer = None if layer is None else int(layer)
        head = None if head is None else int(head)
        if (layer is not None and layer >= layers) or (head is not None and head >= heads):
            raise SackError(f"{e['name']}: index out of range")
        per_head = head is not None
        if kind == "pos":
            fits = {"shared": layer is None, "per_layer": layer is not None and not per_head,
                    "per_head": per_head}[layout]
            shape_ok = len(e["shape"]) == 1 and e["encoding"] == "u32"
            key = (layer, head, segment)
        else:
            fits = layer is not None and per_head == (layout == "per_head")
            if per_head:
                shape_ok = len(e["shape"]) == 2 and e["shape"][1] == head_dim
            else:
                shape_ok = len(e["shape"]) == 3 and e["shape"][0] == heads and e["shape"][2] == head_dim
            shape_ok = shape_ok and e["encoding"] != "u32"
            key = {"shared": (None, None, segment), "per_layer": (layer, None, segment),
                   "per_head": (layer, head, segment)}[layout]
        if not fits or not shape_ok:
            raise SackError(f"{e['name']}: does not fit layout {layout} or has a bad shape")
        if e["dtype"] != DTYPE_OF[e["encoding"]]:
            raise SackError(f"{e['name']}: dtype does not match encoding")
        n = e["shape"][0] if kind == "pos" or per_head else e["shape"][1]
        if n > tokens:
            raise SackError(f"{e['name']}: keeps more tokens than the document has")
        kept.setdefault(key, []).append((kind, n))
    for (_, _, segment), cell in kept.items():
        counts = {n for _, n in cell}
        if "pos" not in {kind for kind, _ in cell} or len(counts) != 1:
            raise SackError(f"segment {segment}: keys and values lack positions or disagree on n")
    names = {e["name"] for e in entries}
    segments = 1 + max((int(NAME.match(x).group(4)) for x in names), default=-1)
    sets = {"shared": 1, "per_layer": layers, "per_head": layers * heads}[layout]
    slots = layers * heads if layout == "per_head" else layers
    counts = [sum(x.startswith(k + ".") for x in names) for k in ("pos", "key", "value")]
    if counts != [segments * sets, segments * slots, segments * slots]:
        raise SackError("directory is incomplete")


def check_tiling(entries, data_start, data_end):
    """The payloads tile the region between the header CRC and the directory."""
    spans = sorted((e["offset"], e["stored_len"], e["name"]) for e in entries)
    at = data_start
    for offset, length, name in spans:
        if offset != at:
            raise SackError(f"{name}: payloads are not contiguous")
        at = offset + length
    if at != data_end:
        raise SackError("payloads do not reach the directory")


def view3(shape):
    """[outer, tokens, channels] view of a shape (ENCODINGS, quantized)."""
    channels = shape[-1]
    tokens = shape[-2] if len(shape) >= 2 else 1
    outer = math.prod(shape[:-2])
    return outer, tokens, channels


def payload_len(entry):
    shape, enc = entry["shape"], entry["encoding"]
    elements = math.prod(shape)
    if enc in WIDTH:
        return elements * WIDTH[enc]
    o, t, c = view3(shape)
    g = entry["group_size"]
    groups = o * -(-t // g) * c if enc.endswith("channel") else o * t * -(-c // g)
    codes = elements if enc.startswith("q8") else -(-elements // 2)
    return 4 * groups + codes


def decode_tensor(data, entry, header):
    """Checks and decodes one tensor to a numpy array (float32, or uint32 for positions)."""
    name = entry["name"]
    stored = data[entry["offset"]:entry["offset"] + entry["stored_len"]]
    if zlib.crc32(stored) != entry["crc32"]:
        raise SackError(f"checksum mismatch in tensor {name}")
    expected = payload_len(entry)
    if entry["compression"] == "zstd":
        if expected > MAX_EXPANSION * entry["stored_len"] + EXPANSION_SLACK:
            raise SackError(f"{name}: zstd payload would expand beyond the format's limit")
        frame = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
        payload = frame.decompress(stored)
        if not frame.eof or frame.unused_data:
            raise SackError(f"{name}: stored bytes are not exactly one zstd frame")
    elif entry["compression"] == "none":
        payload = stored
    else:
        raise SackError(f"{name}: unknown compression")
    if len(payload) != expected:
        raise SackError(f"{name}: payload is {len(payload)} bytes, expected {expected}")
    shape, enc = tuple(entry["shape"]), entry["encoding"]
    if enc == "f32":
        values = np.frombuffer(payload, "<f4")
    elif enc == "u32":
        values = np.frombuffer(payload, "<u4")
        if np.any(np.diff(values.astype(np.int64)) <= 0) or np.any(values >= header["document"]["tokens"]):
            raise SackError(f"{name}: positions must increase and stay below document.tokens")
    elif enc == "bf16":
        values = (np.frombuffer(payload, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif enc == "f16":
        values = np.frombuffer(payload, "<f2").astype(np.float32)
    else:
        values = dequantize(payload, shape, enc, entry["group_size"])
    return values.reshape(shape).astype(values.dtype.newbyteorder("="))


def dequantize(payload, shape, enc, g):
    """min[k] + code * scale[k] in float32 (ENCODINGS, quantized)."""
    o, t, c = view3(shape)
    elements = o * t * c
    if enc.endswith("channel"):
        blocks = -(-t // g)
        group = ((np.arange(o)[:, None, None] * blocks + (np.arange(t) // g)[None, :, None]) * c
                 + np.arange(c)[None, None, :])
        groups = o * blocks * c
    else:
        blocks = -(-c // g)
        group = ((np.arange(o)[:, None, None] * t + np.arange(t)[None, :, None]) * blocks
                 + (np.arange(c) // g)[None, None, :])
        groups = o * t * blocks
    mins = np.frombuffer(payload, "<f2", groups, 0).astype(np.float32)
    scales = np.frombuffer(payload, "<f2", groups, 2 * groups).astype(np.float32)
    if not (np.all(np.isfinite(mins)) and np.all(np.isfinite(scales)) and np.all(scales >= 0)):
        raise SackError("quantization parameters are not finite, or a scale is negative")
    raw = np.frombuffer(payload, np.uint8, offset=4 * groups)
    if enc.startswith("q8"):
        codes = raw
    else:
        if elements % 2 == 1 and raw[-1] >> 4:
            raise SackError("4-bit padding nibble is not zero")
        codes = np.empty(2 * raw.size, np.uint8)
        codes[0::2] = raw & 0x0F
        codes[1::2] = raw >> 4
        codes = codes[:elements]
    codes = codes.reshape(o, t, c).astype(np.float32)
    return (mins[group] + codes * scales[group]).reshape(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--dump", metavar="DIR", help="write each tensor to DIR/<name>.bin")
    args = parser.parse_args()
    try:
        header, tensors = read_sack(args.file)
    except (SackError, ValueError, KeyError, TypeError, zstandard.ZstdError) as e:
        sys.exit(f"{args.file}: {e}")
    print(json.dumps(header, indent=2))
    for name, array in tensors.items():
        print(f"{name:24} {str(array.dtype):8} {list(array.shape)}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            little = array.astype(array.dtype.newbyteorder("<"))
            with open(os.path.join(args.dump, name + ".bin"), "wb") as f:
                f.write(little.tobytes())
    print(f"{len(tensors)} tensors, all checksums match")


if __name__ == "__main__":
    main()
