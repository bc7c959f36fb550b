"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) from the open_clip wheel.

Provenance: OpenAI's CLIP ships its byte-pair vocabulary as `bpe_simple_vocab_16e6.txt.gz`;
the `open_clip_torch` wheel on PyPI carries the same file. This script reads it straight
from the wheel (no open_clip import, no runtime dependency) and writes the Hugging Face
`CLIPTokenizer` layout used by Stable Diffusion 1.x (`<|endoftext|>` as pad token).

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl ldm/configs/clip-tokenizer
"""
from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file


def byte_alphabet() -> list[str]:
    """The 256 stand-in characters GPT-2/CLIP use for raw bytes, in CLIP's vocabulary order:
    the printable bytes as themselves first, then the others mapped to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


def build(wheel: Path, out: Path) -> int:
    with zipfile.ZipFile(wheel) as zf:
        lines = gzip.decompress(zf.read(VOCAB_MEMBER)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {**special, "content": "<|startoftext|>"}, "eos_token": special,
        "pad_token": "<|endoftext|>", "unk_token": special}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False}, indent=2))
    return len(tokens)


if __name__ == "__main__":
    n = build(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {n} tokens to {sys.argv[2]}")
