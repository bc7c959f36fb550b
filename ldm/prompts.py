"""Prompt text -> CLIP embeddings, with A1111's attention syntax, BREAK, long prompts and clip skip.

Syntax (as AUTOMATIC1111's web UI reads it):
    (word)       weight x1.1, nestable: ((word)) = x1.21
    (word:1.3)   explicit weight
    [word]       weight /1.1
    \\( \\) \\[ \\]  literal brackets
    BREAK        start a new 75-token chunk
Prompts longer than 75 tokens are split into chunks of 75 (each wrapped in BOS/EOS and encoded
separately), then concatenated along the sequence axis: nothing is truncated.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from .embeddings import EmbeddingTable, injected

CHUNK_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS
COMMA_BACKTRACK = 20  # A1111 default: a full chunk breaks after a comma this close to its end
ROUND_UP = 1.1
SQUARE_DOWN = 1 / 1.1
PLACEHOLDER = 0  # token id under an embedding's vectors (replaced before the first layer), as A1111

_TOKENS = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])        # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)              # any other backslash is dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ":1.3)" closes a round bracket with that weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs exactly as A1111's `parse_prompt_attention` does.

    BREAK appears as ("BREAK", -1.0); adjacent runs of equal weight are merged.
    """
    runs: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index of the first run inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK.split(chunk)):
            if i:
                runs.append(["BREAK", -1.0])
            runs.append([part, 1.0])

    for m in _TOKENS.finditer(text):
        kind, value = m.lastgroup, m.group(0)
        if m.group("escaped") is not None:
            runs.append([m.group("escaped"), 1.0])
        elif kind == "backslash":
            runs.append(["", 1.0])
        elif kind == "open":
            (open_round if value == "(" else open_square).append(len(runs))
        elif m.group("weight") is not None and open_round and _is_number(m.group("weight")):
            scale_from(open_round.pop(), float(m.group("weight")))
        elif value == ")" and open_round:
            scale_from(open_round.pop(), ROUND_UP)
        elif value == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_DOWN)
        else:  # plain text, or a bracket/weight with nothing open: literal
            add_text(value)

    # Unclosed brackets still apply, rounds first, as A1111 does.
    for start in open_round:
        scale_from(start, ROUND_UP)
    for start in open_square:
        scale_from(start, SQUARE_DOWN)

    if not runs:
        return [("", 1.0)]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


@dataclass
class Chunk:
    """Up to 75 token ids with their weights, before BOS/EOS/padding."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list = field(default_factory=list)  # (offset in ids, ldm.embeddings.Embedding) of textual inversions


class TokenIds:
    """A tokenizer's ids of prompt pieces (no BOS/EOS), remembered for the last `keep` pieces: a run counts
    its prompt's tokens, then each AND sub-prompt's, then chunks every text it encodes, and the tokenizer
    reads each piece once."""

    def __init__(self, tokenizer, keep: int = 256):
        self.tokenizer = tokenizer
        self.comma = _comma_id(tokenizer)

        def read(piece: str) -> tuple[int, ...]:
            return tuple(tokenizer(piece, truncation=False, add_special_tokens=False)["input_ids"])

        self.of = functools.lru_cache(maxsize=keep)(read)  # thread-safe; holds the tokenizer, not self


def chunk_prompt(text: str, tokens: TokenIds, embeddings: EmbeddingTable | None = None) -> list[Chunk]:
    """Tokenize a prompt into 75-token chunks carrying per-token weights (A1111's rules). Words naming an
    embedding in `embeddings` become its vectors' places; an embedding never straddles two chunks."""
    parsed = parse_attention(text)
    comma = tokens.comma
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = Chunk(), -1

    for piece, weight in parsed:
        if piece == "BREAK" and weight == -1:
            close_chunk()
            continue
        ids = tokens.of(piece)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(current.ids)
            elif len(current.ids) == CHUNK_TOKENS and last_comma != -1 and len(current.ids) - last_comma <= COMMA_BACKTRACK:
                # Keep the words after the last comma together in the next chunk.
                cut = last_comma + 1
                carried = Chunk(current.ids[cut:], current.weights[cut:], [(o - cut, e) for o, e in current.fixes if o >= cut])
                del current.ids[cut:], current.weights[cut:]
                current.fixes = [(o, e) for o, e in current.fixes if o < cut]
                close_chunk()
                current = carried
            if len(current.ids) == CHUNK_TOKENS:
                close_chunk()
            found = embeddings.find_at(ids, position) if embeddings else None
            if found is None:
                current.ids.append(token)
                current.weights.append(weight)
                position += 1
                continue
            embedding, span = found
            n = embedding.vectors.shape[0]
            if len(current.ids) + n > CHUNK_TOKENS:  # never split an embedding across chunks
                close_chunk()
            current.fixes.append((len(current.ids), embedding))
            current.ids += [PLACEHOLDER] * n
            current.weights += [weight] * n
            position += span
    if current.ids or not chunks:
        close_chunk()
    return chunks


def _comma_id(tokenizer) -> int | None:
    """The id of "," as a word end. One lookup: `get_vocab()` copies the 49k-entry vocabulary (~80 ms a call)."""
    token = tokenizer.convert_tokens_to_ids(",</w>")
    return None if token is None or token == tokenizer.unk_token_id else token


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel; older releases keep it under .text_model
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


class PromptEncoder:
    """Turns prompt text into U-Net conditioning with a CLIP tokenizer and text encoder."""

    def __init__(self, tokenizer, text_encoder, embeddings=None):
        self.tokenizer = tokenizer
        self.tokens = TokenIds(tokenizer)
        self.text_encoder = text_encoder
        self.embeddings = embeddings  # ldm.embeddings.EncoderEmbeddings, or None: no textual inversion

    def chunks(self, text: str) -> list[Chunk]:
        if not self.embeddings:
            return chunk_prompt(text, self.tokens)
        table = self.embeddings.table()
        return chunk_prompt(table.explicit(text), self.tokens, table)

    def token_count(self, text: str) -> int:
        return sum(len(c.ids) for c in self.chunks(text))

    def embeddings_in(self, *texts: str) -> list:
        """The embeddings (ldm.embeddings.Embedding) the texts call, in order."""
        return [e for t in texts if t and self.embeddings for c in self.chunks(t) for _, e in c.fixes]

    def encode_pair(self, prompt: str, negative_prompt: str, *, clip_skip: int = 1, need_negative: bool = True):
        """(cond, uncond) embeddings of equal length, each [1, 77 * chunks, dim]; uncond is None when not needed."""
        cond_chunks = self.chunks(prompt)
        if not need_negative:
            return self.encode_chunks(cond_chunks, clip_skip), None
        uncond_chunks = self.chunks(negative_prompt)
        n = max(len(cond_chunks), len(uncond_chunks))
        # The shorter side is padded with empty chunks so both have the same sequence length.
        cond_chunks += [Chunk() for _ in range(n - len(cond_chunks))]
        uncond_chunks += [Chunk() for _ in range(n - len(uncond_chunks))]
        return self.encode_chunks(cond_chunks, clip_skip), self.encode_chunks(uncond_chunks, clip_skip)

    def encode_chunks(self, chunks: list[Chunk], clip_skip: int) -> torch.Tensor:
        with injected(self.text_encoder, [[(1 + o, e.vectors) for o, e in c.fixes] for c in chunks]):  # 1: BOS
            z = self.hidden(self.token_ids(chunks), clip_skip)
        return self.weighted(z, chunks)

    def token_ids(self, chunks: list[Chunk]) -> torch.Tensor:
        """[chunks, 77] ids laid out as the tokenizer's own padding: BOS, tokens, EOS, then pad."""
        tok = self.tokenizer
        length = CHUNK_TOKENS + 2
        rows = [[tok.bos_token_id, *c.ids, tok.eos_token_id] for c in chunks]
        rows = [r + [tok.pad_token_id] * (length - len(r)) for r in rows]
        return torch.tensor(rows, dtype=torch.long, device=self.text_encoder.device)

    def hidden(self, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        """The token embeddings the U-Net attends to: the last layer, or hidden state -clip_skip through the final norm."""
        if clip_skip <= 1:
            return self.text_encoder(ids)[0]
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states
        return final_layer_norm(self.text_encoder)(hidden[-clip_skip])

    def weighted(self, z: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """Per-chunk embeddings [chunks, 77, dim] -> [1, 77 * chunks, dim] with the chunks' weights applied."""
        out = []
        for i, c in enumerate(chunks):
            zi = z[i : i + 1]
            if any(w != 1.0 for w in c.weights):
                zi = _apply_weights(zi, c.weights)
            out.append(zi)
        return torch.cat(out, dim=1).to(self.text_encoder.dtype)


def _apply_weights(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Scale token embeddings by their weights, then restore the chunk's mean (A1111's 'original' emphasis)."""
    w = torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
    w[1 : 1 + len(weights)] = torch.tensor(weights, dtype=z.dtype)
    before = z.mean()
    z = z * w[None, :, None]
    after = z.mean()
    # A1111 divides unconditionally; a chunk whose mean is ~0 would turn into inf/NaN, so skip it there.
    return z * (before / after) if after.abs() > 1e-6 * z.abs().mean() else z
