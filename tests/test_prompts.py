import pytest
import torch

from ldm.prompts import TokenIds, chunk_prompt, parse_attention


# Examples from A1111's parse_prompt_attention docstring, with its exact outputs.
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("[word]", [("word", 0.9090909090909091)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("close) without open", [("close) without open", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    ("\\\\ back", [("\\ back", 1.0)]),
])
def test_parse_attention_matches_a1111(text, expected):
    assert parse_attention(text) == expected


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from tiny import TOKENIZER
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def test_real_clip_vocabulary(tokenizer):
    assert len(tokenizer) == 49408
    ids = tokenizer("a photo of an astronaut riding a horse on mars").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]


def test_long_prompt_is_chunked_not_truncated(tokenizer):
    text = " ".join(["castle"] * 200)
    chunks = chunk_prompt(text, TokenIds(tokenizer))
    assert [len(c.ids) for c in chunks] == [75, 75, 50]


def test_break_starts_new_chunk(tokenizer):
    chunks = chunk_prompt("a cat BREAK a dog", TokenIds(tokenizer))
    assert len(chunks) == 2 and len(chunks[0].ids) == 2 and len(chunks[1].ids) == 2


def test_comma_backtrack_keeps_phrase_together(tokenizer):
    text = "a " * 70 + ", red big shiny ball here"  # comma at 70, chunk fills at 75
    chunks = chunk_prompt(text, TokenIds(tokenizer))
    assert len(chunks[0].ids) == 71 and tokenizer.convert_ids_to_tokens(chunks[0].ids[-1]) == ",</w>"


def test_weights_follow_tokens(tokenizer):
    (chunk,) = chunk_prompt("a (red:1.5) ball", TokenIds(tokenizer))
    assert chunk.weights == [1.0, 1.5, 1.0]


def test_embeddings_shapes_and_padding_to_same_length(base_pipe):
    long = " ".join(["castle"] * 100)
    cond, uncond = base_pipe.prompts.encode_pair(long, "blurry")
    assert cond.shape == uncond.shape == (1, 154, 32)
    cond, uncond = base_pipe.prompts.encode_pair("cat", long)
    assert cond.shape == uncond.shape == (1, 154, 32)
    cond, none = base_pipe.prompts.encode_pair("cat", "x", need_negative=False)
    assert none is None and cond.shape == (1, 77, 32)


def test_plain_prompt_equals_diffusers_embeddings_exactly(base_model, base_pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for text in ["a photo of an astronaut riding a horse on mars", "", "sunset, 4k, " * 6]:
        ours, _ = base_pipe.prompts.encode_pair(text, "", need_negative=False)
        theirs, _ = ref.encode_prompt(text, "cpu", 1, False)
        assert torch.equal(ours, theirs), text


def test_weighting_restores_mean(base_pipe):
    plain, _ = base_pipe.prompts.encode_pair("a red ball", "", need_negative=False)
    weighted, _ = base_pipe.prompts.encode_pair("a (red:1.5) ball", "", need_negative=False)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-6)
    assert not torch.allclose(plain, weighted)


def test_weighting_a_zero_mean_chunk_stays_finite():
    from ldm.prompts import _apply_weights

    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]])  # mean exactly 0
    out = _apply_weights(z, [1.5])
    assert torch.isfinite(out).all() and torch.equal(out[0, 1], torch.tensor([3.0, -3.0]))
